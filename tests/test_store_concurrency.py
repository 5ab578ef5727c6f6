"""Many threads storing and loading overlapping prefixes: no lost or mixed chunk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import init_cache
from conftest import tiny_config
from store_helpers import CHUNK, make_store, tokens_for

DOC = tokens_for(100, 64)


def sequence(seed: int) -> list[int]:
  """Sequences sharing 0 to 4 chunks of one document, then their own tokens."""
  shared = CHUNK * (seed % 5)
  return DOC[:shared] + tokens_for(seed, 64 - shared)


def chunk_content(key: bytes, shape) -> np.ndarray:
  """What a chunk with this key holds: a function of the key alone."""
  return np.random.default_rng(int.from_bytes(key[:8], "little")).standard_normal(
      shape).astype(np.float32)


def keyed_cache(store, tokens):
  cache = init_cache(tiny_config(), 1, 64, jnp.float32)
  keys = np.zeros(cache.keys.shape, np.float32)
  values = np.zeros(cache.values.shape, np.float32)
  shape = keys[:, 0, :, :CHUNK].shape
  for i, key in enumerate(store.keys(tokens)):
    keys[:, 0, :, i * CHUNK:(i + 1) * CHUNK] = chunk_content(key, shape)
    values[:, 0, :, i * CHUNK:(i + 1) * CHUNK] = -chunk_content(key, shape)
  return cache.replace(keys=jnp.asarray(keys), values=jnp.asarray(values),
                       lengths=jnp.array([64], jnp.int32))


def test_threads_store_and_load_overlapping_prefixes(tmp_path):
  chunk_bytes = 2 * 3 * 2 * CHUNK * 8 * 4
  # Small memory tiers force eviction under load; the disk holds everything.
  store = make_store(device_bytes=6 * chunk_bytes, host_bytes=10 * chunk_bytes,
                     disk_dir=str(tmp_path), disk_bytes=1 << 22)
  seeds = list(range(12))
  caches = {s: keyed_cache(store, sequence(s)) for s in seeds}
  errors, loads = [], [0]
  stop = time.monotonic() + 6.0

  def work(thread: int):
    rng = np.random.default_rng(thread)
    try:
      while time.monotonic() < stop:
        seed = int(rng.choice(seeds))
        tokens = sequence(seed)
        if rng.random() < 0.4:
          store.store(tokens, caches[seed])
          continue
        prefix = store.load(tokens)
        for key, chunk in zip(store.keys(tokens), prefix.chunks):
          want = chunk_content(key, chunk[0].shape)
          np.testing.assert_array_equal(chunk[0], want)
          np.testing.assert_array_equal(chunk[1], -want)
        loads[0] += 1
    except Exception as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[0]
  assert loads[0] > 10
  store.flush()
  for seed in seeds:
    tokens = sequence(seed)
    stored = any(store.keys(tokens)[-1] in tier for tier in store.tiers)
    if stored:
      assert store.lookup(tokens) == 64, f"sequence {seed} lost a chunk"
  for tier in store.tiers:
    assert tier.used <= tier.capacity, tier.name
    assert tier.used == sum(tier._sizes.values())


def test_queued_disk_writes_are_neither_written_nor_counted_twice(tmp_path):
  """A second store() of the same tokens while the disk worker has not run
  yet adds nothing; a chunk counts as stored once, when it is written."""
  store = make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20)
  tokens = tokens_for(7, 32)
  cache = keyed_cache(store, tokens)
  gate, calls = threading.Event(), []
  write = store._write_storage

  def held_back(keys, copies, counted):
    calls.append(len(keys))
    gate.wait(timeout=60)
    return write(keys, copies, counted)

  store._write_storage = held_back
  assert store.store(tokens, cache) == 4          # queued, not yet written
  assert store.store(tokens, cache) == 0          # queued once
  assert store.stats["stored"] == 0
  gate.set()
  store.flush()
  assert calls == [4] and store.lookup(tokens) == 32
  assert store.stats["stored"] == 4
  store.close()


def test_failed_disk_writes_are_not_counted_as_stored(tmp_path, caplog):
  """store() counts only chunks written; a failed write is logged once and
  counted in stats['write_failed'], and a later store() retries."""
  store = make_store(host_bytes=1 << 20, disk_dir=str(tmp_path),
                     disk_bytes=1 << 20)
  disk = store.tier("disk")
  put = disk.put

  def failing_put(key, value, nbytes):
    raise OSError(28, "No space left on device")

  disk.put = failing_put
  tokens = tokens_for(8, 16)
  with caplog.at_level(logging.WARNING, "lmcache_jax.store"):
    assert store.store(tokens, keyed_cache(store, tokens), wait=True) == 2
    disk_only = make_store(disk_dir=str(tmp_path / "b"), disk_bytes=1 << 20)
    disk_only.tier("disk").put = failing_put
    assert disk_only.store(tokens, keyed_cache(store, tokens), wait=True) == 0
  assert caplog.text.count("cannot write a chunk (No space left") == 2
  assert store.stats["write_failed"] == 2 and store.stats["stored"] == 2
  assert disk_only.stats["write_failed"] == 2 and disk_only.stats["stored"] == 0
  assert len(disk) == 0 and disk_only.lookup(tokens) == 0
  disk.put = put
  assert store.store(tokens, keyed_cache(store, tokens), wait=True) == 2
  assert len(disk) == 2 and store.stats["stored"] == 4
  store.close()
  disk_only.close()


SHARER = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (imports the package the way pytest does)
import numpy as np
from store_helpers import assert_prefix_is, filled_cache, make_store, tokens_for
rng = np.random.default_rng({first})
with make_store(disk_dir={directory!r}, disk_bytes={capacity}) as store:
  loaded = 0
  for seed in range({first}, {first} + 40):
    store.store(tokens_for(seed % 50, 64), filled_cache(seed % 50), wait=True)
    other = int(rng.integers(0, 50))
    prefix = store.load(tokens_for(other, 64))
    assert_prefix_is(prefix, filled_cache(other))
    loaded += prefix.num_tokens
  print(json.dumps(dict(store.stats, loaded=loaded)))
"""


def test_two_processes_share_a_directory(tmp_path):
  """Two processes store, evict and load overlapping sequences in one
  directory at once: every load is intact, no write fails, and they leave
  only chunks and the store's own two files behind."""
  chunk_bytes = 2 * 3 * 2 * CHUNK * 8 * 4 + 256
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  children = [subprocess.Popen(
      [sys.executable, "-c", SHARER.format(
          tests=os.path.dirname(__file__), directory=str(tmp_path),
          first=first, capacity=24 * chunk_bytes)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for first in (0, 25)]
  results = [child.communicate(timeout=300) for child in children]
  for child, (out, err) in zip(children, results):
    assert child.returncode == 0, err[-2000:]
    stats = json.loads(out)
    assert stats.get("write_failed", 0) == 0 and stats.get("dropped", 0) == 0
    assert stats["stored"] > 0 and stats["loaded"] > 0
  leftovers = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".kv")
  assert leftovers == [".lmcache.lock", "store.json"]
