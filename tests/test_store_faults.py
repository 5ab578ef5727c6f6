"""Fault injection on the disk tier: nothing damaged is served, runs complete."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.engine.generate import generate
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.models.llama import from_weights
from lmcache_jax.store.tiers import disk as disk_module
from lmcache_jax.store.crypto import load_cipher
from lmcache_jax.store.keys import model_fingerprint
from lmcache_jax.store.layout import slice_chunk
from conftest import tiny_config, tiny_weights
from store_helpers import assert_prefix_is, filled_cache, make_store, tokens_for

TOKENS = tokens_for(7, 64)


def chunk_files(directory):
  return sorted(p for p in directory.iterdir() if p.suffix == ".kv")


def file_of(store, directory, index):
  return directory / (store.keys(TOKENS)[index].hex() + ".kv")


@pytest.fixture
def written(tmp_path):
  """A disk store holding 8 chunks of a known cache, and that cache."""
  cache = filled_cache(7)
  store = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  store.store(TOKENS, cache, wait=True)
  assert len(chunk_files(tmp_path)) == 8
  return store, cache, tmp_path


def reopen(directory, **tiers):
  return make_store(disk_dir=str(directory), disk_bytes=1 << 20, **tiers)


def flip_byte(path, offset):
  data = bytearray(path.read_bytes())
  data[offset % len(data)] ^= 0x40
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_header", "flip_payload", "flip_sum",
                                    "truncate", "empty", "delete"])
def test_damaged_chunk_is_dropped_not_served(written, damage, caplog):
  store, cache, directory = written
  path = file_of(store, directory, 3)
  if damage == "delete":
    path.unlink()
  elif damage == "truncate":
    path.write_bytes(path.read_bytes()[:-100])
  elif damage == "empty":
    path.write_bytes(b"")
  else:
    offset = {"flip_header": 20, "flip_payload": 2000, "flip_sum": -1}[damage]
    flip_byte(path, offset)
  fresh = reopen(directory)
  with caplog.at_level(logging.WARNING, "lmcache_jax.store"):
    prefix = fresh.load(TOKENS)
  assert prefix.num_tokens == 3 * 8
  assert_prefix_is(prefix, cache)
  assert not path.exists()
  if damage != "delete":
    assert "dropped damaged chunk" in caplog.text
  assert fresh.lookup(TOKENS) == 3 * 8


def test_swapped_chunk_files_are_rejected(written):
  store, cache, directory = written
  a, b = file_of(store, directory, 2), file_of(store, directory, 5)
  tmp = directory / "swap"
  a.rename(tmp)
  b.rename(a)
  tmp.rename(b)
  prefix = reopen(directory).load(TOKENS)
  assert prefix.num_tokens == 2 * 8
  assert_prefix_is(prefix, cache)


def test_chunk_of_another_model_is_not_a_hit(written):
  _, _, directory = written
  other = make_store(fingerprint=b"another model", disk_dir=str(directory),
                     disk_bytes=1 << 20)
  assert other.lookup(TOKENS) == 0


KILLED_WRITER = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (imports the package the way pytest does)
from store_helpers import filled_cache, make_store, tokens_for
store = make_store(disk_dir={directory!r}, disk_bytes=1 << 30)
for seed in range(10_000):
  store.store(tokens_for(seed, 64), filled_cache(seed), wait=True)
  print(seed, flush=True)
"""


def test_write_killed_midway_leaves_no_damage(tmp_path):
  script = KILLED_WRITER.format(tests=os.path.dirname(__file__),
                                directory=str(tmp_path))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  child = subprocess.Popen([sys.executable, "-c", script], env=env,
                           stdout=subprocess.PIPE, text=True)
  done = []
  deadline = time.monotonic() + 120
  while len(done) < 4 and time.monotonic() < deadline:
    line = child.stdout.readline()
    if not line:
      break
    done.append(int(line))
  time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert len(done) >= 4, "the writer never got going"
  # What a kill inside a write leaves: a partial temporary of the dead
  # writer's tier, besides its owner file.
  dead = next(tmp_path.glob(".lmcache-*.owner")).name[len(".lmcache-"):-6]
  (tmp_path / f".lmcache-{dead}-{'0' * 32}.tmp").write_bytes(b"LMKV\x01partial")
  (tmp_path / "another-program.tmp").write_bytes(b"not the store's")
  store = reopen(tmp_path)
  assert [p.name for p in tmp_path.glob("*.tmp")] == ["another-program.tmp"]
  assert not (tmp_path / f".lmcache-{dead}.owner").exists()
  for seed in range(done[-1] + 3):
    tokens = tokens_for(seed, 64)
    prefix = store.load(tokens)
    if seed <= done[-1]:
      assert prefix.num_tokens == 64
    assert_prefix_is(prefix, filled_cache(seed))


class FullDiskFile:
  """A file that takes a few bytes and then reports a full disk."""

  def __init__(self, path, mode):
    self._file = open(path, mode)

  def write(self, data):
    self._file.write(data[:10])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


def test_full_disk_degrades_to_memory_tiers(tmp_path, monkeypatch, caplog):
  store = make_store(host_bytes=1 << 20, disk_dir=str(tmp_path),
                     disk_bytes=1 << 20)
  monkeypatch.setattr(disk_module, "open", FullDiskFile, raising=False)
  cache = filled_cache(8)
  with caplog.at_level(logging.WARNING, "lmcache_jax.store"):
    store.store(TOKENS, cache, wait=True)
  assert "No space left on device" in caplog.text
  assert caplog.text.count("cannot write a chunk") == 1  # said once
  assert not list(tmp_path.glob("*.kv")) and not list(tmp_path.glob("*.tmp"))
  assert len(store.tier("disk")) == 0
  prefix = store.load(TOKENS)
  assert prefix.sources == ["host"] * 8
  assert_prefix_is(prefix, cache)


def test_disk_capacity_evicts_and_stays_within_bounds(tmp_path):
  nbytes = len((lambda s: (s.store(TOKENS, filled_cache(0), wait=True),
                           chunk_files(tmp_path / "probe")[0].read_bytes())[1])(
      make_store(disk_dir=str(tmp_path / "probe"), disk_bytes=1 << 20)))
  directory = tmp_path / "small"
  store = make_store(disk_dir=str(directory), disk_bytes=5 * nbytes)
  for seed in range(3):
    store.store(tokens_for(seed, 64), filled_cache(seed), wait=True)
    assert len(chunk_files(directory)) <= 5
    assert store.tier("disk").used <= 5 * nbytes
  # The newest sequence's first chunks survive under lru.
  prefix = store.load(tokens_for(2, 64))
  assert prefix.num_tokens > 0
  assert_prefix_is(prefix, filled_cache(2))
  reopened = make_store(disk_dir=str(directory), disk_bytes=2 * nbytes)
  assert len(chunk_files(directory)) == 2 and len(reopened.tier("disk")) == 2


def test_generation_completes_exactly_over_damaged_files(tmp_path):
  cfg = tiny_config()
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))
  prompt = tokens_for(9, 50)
  cold = generate(lm, [prompt], max_new_tokens=4)
  store = make_store(model_fingerprint(lm), disk_dir=str(tmp_path),
                     disk_bytes=1 << 20)
  generate_with_store(lm, [prompt], store, max_new_tokens=4)
  store.flush()
  files = sorted(tmp_path.glob("*.kv"), key=lambda p: p.stat().st_mtime_ns)
  for path in files[1::2]:
    flip_byte(path, 777)
  warm = generate_with_store(lm, [prompt], store, max_new_tokens=4)
  assert warm.generation.tokens == cold.tokens
  np.testing.assert_allclose(warm.generation.prompt_logits, cold.prompt_logits,
                             rtol=1e-5, atol=1e-5)
  assert warm.hit_tokens[0] < 48


class PausedFile:
  """A file whose write says it began (``writing``), then waits for
  ``gate``: a write caught midway."""
  writing = gate = None

  def __init__(self, path, mode):
    self._file = open(path, mode)

  def write(self, data):
    PausedFile.writing.set()
    PausedFile.gate.wait(timeout=60)
    return self._file.write(data)

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


def test_a_second_tier_on_the_directory_spares_the_first_ones_writes(
    tmp_path, monkeypatch):
  """Opening the directory again (another process, or here another tier)
  removes no temporary of a live tier, nor any file of another program."""
  (tmp_path / "another-program.tmp").write_bytes(b"theirs")
  store = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  PausedFile.gate, PausedFile.writing = threading.Event(), threading.Event()
  monkeypatch.setattr(disk_module, "open", PausedFile, raising=False)
  writes = store._submit(store._write_storage, [store.keys(TOKENS)[0]],
                         [tuple(np.asarray(a) for a in _first_chunk(store))])
  assert PausedFile.writing.wait(timeout=30)
  monkeypatch.undo()
  second = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  PausedFile.gate.set()
  assert len(writes.result()) == 1 and store.stats["write_failed"] == 0
  assert (tmp_path / "another-program.tmp").read_bytes() == b"theirs"
  assert second.lookup(TOKENS) == 0 and store.lookup(TOKENS) == 8
  store.close()
  second.close()
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(
      ".kv")) == [".lmcache.lock", "another-program.tmp", "store.json"]


def _first_chunk(store):
  return slice_chunk(filled_cache(7), store.layout, 0, 0, store.chunk_size)


def test_a_chunk_another_tier_used_since_is_not_evicted(tmp_path):
  """A tier evicts a chunk file only if no other has written or read it
  since this one did: the other keeps its hit."""
  first = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  first.store(TOKENS, filled_cache(7), wait=True)
  size = os.path.getsize(file_of(first, tmp_path, 0))
  first.close()
  owner = make_store(disk_dir=str(tmp_path), disk_bytes=8 * size)
  other = make_store(disk_dir=str(tmp_path), disk_bytes=8 * size)
  assert other.load(TOKENS).num_tokens == 64        # reads (touches) all 8
  owner.store(tokens_for(1, 64), filled_cache(1), wait=True)  # evicts all 8
  assert owner.lookup(TOKENS) == 0
  prefix = other.load(TOKENS)
  assert prefix.num_tokens == 64 and prefix.sources == ["disk"] * 8
  assert_prefix_is(prefix, filled_cache(7))
  owner.close()
  other.close()


def test_unreadable_store_json_is_refused_and_no_chunk_is_deleted(tmp_path):
  key_file = tmp_path / "key"
  key_file.write_bytes(os.urandom(32))
  directory = tmp_path / "store"
  store = make_store(disk_dir=str(directory), disk_bytes=1 << 20,
                     cipher=load_cipher(str(key_file)))
  store.store(TOKENS, filled_cache(7), wait=True)
  store.close()
  meta = directory / "store.json"
  meta.write_bytes(meta.read_bytes()[:20])           # torn
  for cipher in (None, load_cipher(str(key_file))):
    with pytest.raises(ValueError, match=f"disk store's '{meta}' is "
                       f"unreadable .*will not guess"):
      make_store(disk_dir=str(directory), disk_bytes=1 << 20, cipher=cipher)
  meta.unlink()
  with pytest.raises(ValueError, match="holds 8 chunk files but no store.json"):
    make_store(disk_dir=str(directory), disk_bytes=1 << 20)
  assert len(chunk_files(directory)) == 8


def test_files_are_fsynced_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch):
  store = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  events = []
  fsync, replace = os.fsync, os.replace

  def recording_fsync(fd):
    events.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
    fsync(fd)

  def recording_replace(src, dst):
    events.append("rename")
    replace(src, dst)

  monkeypatch.setattr(disk_module.os, "fsync", recording_fsync)
  monkeypatch.setattr(disk_module.os, "replace", recording_replace)
  store.store(TOKENS[:8], filled_cache(7), wait=True)
  assert events == ["file", "rename", "dir"]
  store.close()
