"""The run script and its error messages."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import subprocess
import sys
import types

import jax.numpy as jnp
import ml_collections
import pytest

from conftest import tiny_config, tiny_weights
from experiments import results
from experiments import run as run_module
from experiments import setup
from experiments.errors import InputError
from experiments.tasks import TASKS
from experiments.texts import load_eval_text
from lmcache_jax import defaults, models
from lmcache_jax.engine import generate
from lmcache_jax.models import LoadedModel
from lmcache_jax.models.llama import from_weights
from configs import default
from policies.registry import EVICTION


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.run", *args],
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = tiny_config()
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match="llama2-13b"):
    models.load("no-such-model")


def test_missing_weight_file():
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load("/nonexistent/model.gguf")


def test_corrupt_weight_file(tmp_path):
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 64)
  with pytest.raises(ValueError, match="broken.gguf"):
    models.load(str(bad))


def test_context_longer_than_capacity(tiny_lm):
  with pytest.raises(ValueError, match="cache slots"):
    generate(tiny_lm, [[1, 2, 3]], max_new_tokens=10, capacity=8)


def test_empty_prompt(tiny_lm):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(tiny_lm, [[1, 2], []], max_new_tokens=2)


def test_token_outside_vocabulary(tiny_lm):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(tiny_lm, [[1, 5000]], max_new_tokens=2)


def test_non_utf8_text_file(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  with pytest.raises(ValueError, match="not UTF-8"):
    load_eval_text("hamlet", str(path))


@pytest.mark.parametrize("budget,context,message", [
    (0, 100, "must be positive"),
    (-3, 100, "must be positive"),
    (500, 100, "larger than the context"),
    (12.5, 100, "neither a whole number"),
])
def test_bad_budget(budget, context, message):
  with pytest.raises(ValueError, match=message):
    setup.resolve_budget(budget, context)


def test_budget_fraction_and_tokens():
  assert setup.resolve_budget(0.25, 1000) == 250
  assert setup.resolve_budget(128, 1000) == 128


def test_full_policy_rejects_budget():
  config = ml_collections.ConfigDict({"name": "full", "budget": 64.0})
  with pytest.raises(ValueError, match="takes no --budget"):
    setup.make_policy(config, 1000)


def test_run_in_process_writes_results(tmp_path, tiny_lm, monkeypatch):
  config = default.get_config("runlocal").unlock()
  config.output_dir = str(tmp_path)
  config.context = 64
  text = tmp_path / "text.txt"
  text.write_text("abc def ghi " * 50)
  config.text_file = str(text)
  config.model = "tiny-test"
  monkeypatch.setattr(type(tiny_lm), "tokenizer", property(
      lambda self: _ByteTokenizer(self.cfg.vocab_size)), raising=False)
  results = run_module.run(config.lock(), tiny_lm)
  for key in ("task", "model", "policy", "context", "tokens", "ppl",
              "kv_bytes", "seconds"):
    assert key in results
  assert results["tokens"] == 64
  run_dir = run_module.write_results(config, results)
  saved = json.loads((run_dir / "results.json").read_text())
  assert saved["ppl"] == pytest.approx(results["ppl"])
  assert json.loads((run_dir / "config.json").read_text())["config"]["context"] == 64


def test_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
  class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
      return cls(2026, 1, 2, 3, 4, 5)

  monkeypatch.setattr(run_module, "datetime",
                      types.SimpleNamespace(datetime=Frozen))
  config = default.get_config()
  config.output_dir = str(tmp_path)
  first = run_module.write_results(config, {"ppl": 1.0, "code_version": "a"})
  second = run_module.write_results(config, {"ppl": 2.0, "code_version": "a"})
  assert first.name == "20260102-030405-perplexity-smollm2-135m-full"
  assert second.name == first.name + "-2"
  assert json.loads((first / "results.json").read_text())["ppl"] == 1.0
  assert json.loads((second / "results.json").read_text())["ppl"] == 2.0
  # Started together, eight runs still get eight folders.
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    folders = list(pool.map(lambda _: results.new_folder(tmp_path, "same"),
                            range(8)))
  assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)


class _ByteTokenizer:
  """Bytes modulo the vocabulary: enough to feed a tiny random model."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text, add_bos=False):
    del add_bos
    return [b % self.vocab_size for b in text.encode()]


@pytest.mark.parametrize("args,message", [
    (["--model=no-such-model"], "unknown"),
    (["--policy=no_such_policy"], "unknown eviction policy"),
    (["--task=no_such_task"], "unknown task name"),
    (["--text_file=/no/such/file.txt"], "is not a file"),
    (["--config.perplexty.chunk=3"], "did you mean 'perplexity'"),
    (["--config.perplexity.chnk=3"], "did you mean 'chunk'"),
    (["--model=llama2-7b"], "random:llama2-7b"),
    (["--model=random:tiny"], "needs a tokenizer"),
    (["--context=999999"], "positions for (8192)"),
    (["--kv_bits=5"], "use 2, 3, 4 or 8"),
    (["--task=generate", "--prompt= "], "--prompt is empty"),
    (["--policy=snapkv(budget=64)", "--budget=128"], "two budgets"),
    (["--task=quant_table", "--config.quant.table_policies=uniform,kvqant",
      "--dry_run"], "unknown calibration policy 'kvqant'"),
])
def test_cli_errors_are_one_line(args, message):
  """Each fails in seconds, before any model loads, in one line."""
  out = run_cli(*args)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def run_cli_patched(patch: str, *args: str) -> subprocess.CompletedProcess:
  """The command line after ``patch`` (code that may use ``run``, ``setup``
  and ``InputError``) replaced a part of it."""
  script = "\n".join([
      "import sys", "from absl import app", "from experiments import run, setup",
      "from experiments.errors import InputError", patch,
      "sys.argv[0] = 'experiments.run'", "app.run(run.main)"])
  return subprocess.run([sys.executable, "-c", script, *args],
                        capture_output=True, text=True, timeout=300)


def check_raising(error: str) -> str:
  return f"def check(*args, **kwargs):\n  raise {error}\nsetup.check = check"


def test_cli_shows_input_errors_in_one_line_and_faults_with_traceback():
  bad_input = run_cli_patched(check_raising("InputError('--foo=3: use 1 or 2')"),
                              "--dry_run")
  assert bad_input.returncode == 1
  assert bad_input.stderr.strip() == "error: --foo=3: use 1 or 2"
  fault = run_cli_patched(check_raising("ValueError('an internal fault')"),
                          "--dry_run")
  assert fault.returncode == 1
  assert "Traceback (most recent call last)" in fault.stderr
  assert fault.stderr.strip().endswith("ValueError: an internal fault")


SINK_COPIES = (r"--policy=attention_sink re-rotates its 4 sink keys at every "
               r"eviction, which a quantized cache does on exact copies of them "
               r"in the cache dtype: add {fixes}, or use --kv_bits=16")


def test_attention_sink_on_a_quantized_cache_names_the_settings_it_needs():
  config = default.get_config()
  config.policy.name, config.quant.kv_bits = "attention_sink", 4.0
  with pytest.raises(InputError, match=SINK_COPIES.format(
      fixes=r"--config.quant.copy_bits=16 \(now 8\)")):
    setup.check(config, TASKS.names())
  config.quant.sinks = 2
  with pytest.raises(InputError, match=SINK_COPIES.format(
      fixes=r"--config.quant.sinks=4 \(now 2\) and --config.quant.copy_bits=16 "
            r"\(now 8\)")):
    setup.check(config, TASKS.names())
  config.quant.sinks, config.quant.copy_bits = 4, 16
  setup.check(config, TASKS.names())
  config.policy.name = "attention_sink(reposition=False)"
  config.quant.copy_bits = 8
  setup.check(config, TASKS.names())


def test_attention_sink_on_a_quantized_cache_is_refused_before_the_model_loads():
  never_load = ("def load_model(config):\n  raise AssertionError('loaded')\n"
                "setup.load_model = load_model")
  out = run_cli_patched(never_load, "--policy=attention_sink", "--kv_bits=4")
  assert out.returncode == 1 and "loaded" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "add --config.quant.copy_bits=16 (now 8)" in out.stderr


def test_text_that_is_not_prose(tmp_path):
  path = tmp_path / "zeros.txt"
  path.write_bytes(b"\x00" * 4096)
  with pytest.raises(ValueError, match="not prose"):
    load_eval_text("hamlet", str(path))


def test_budget_defaults_and_fraction_of_the_prompt():
  make = lambda budget, prompt: setup.make_policy(  # noqa: E731
      ml_collections.ConfigDict({"name": "attention_sink", "budget": budget}),
      prompt)
  assert make(0.0, 4096).budget == setup.DEFAULT_BUDGET
  assert make(0.0, 100).budget == 100
  assert make(0.125, 1024).budget == 128
  sink = make(256.0, 4096)
  assert defaults.working_chunk(sink, 256) == 64
  assert sink.cache_capacity(4096, defaults.working_chunk(sink, 256)) == 256 + 64


@pytest.mark.parametrize("spec,flag,built", [
    ("snapkv(budget=64)", 0.0, "snapkv(budget=64)"),    # not the default 256
    ("snapkv(budget=64, window=8)", 64.0, "snapkv(budget=64, window=8)"),
    ("snapkv(window=8)", 64.0, "snapkv(budget=64, window=8)"),
    ("attention_sink(budget=0.125)", 0.0, "attention_sink(budget=512)"),
])
def test_budget_in_the_policy_spec_wins_over_the_default(spec, flag, built):
  policy = setup.make_policy(
      ml_collections.ConfigDict({"name": spec, "budget": flag}), 4096)
  assert policy == EVICTION.make(built)


def test_two_different_budgets_are_an_error_naming_both():
  config = ml_collections.ConfigDict({"name": "snapkv(budget=64)",
                                      "budget": 128.0})
  with pytest.raises(ValueError, match=r"two budgets: --policy='snapkv\(budget"
                     r"=64\)' says 64 and --budget says 128; give one"):
    setup.make_policy(config, 4096)


def test_cli_lists_policies():
  out = run_cli("--policy=list")
  assert out.returncode == 0
  assert "full" in out.stdout
