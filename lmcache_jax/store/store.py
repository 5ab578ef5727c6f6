"""The prefix store: chunked KV in device, host and disk tiers, reused across requests.

``store`` writes a sequence's new whole chunks through to every tier (device
and host at once, disk in the background); ``lookup`` finds the longest
prefix of stored chunks; ``load`` brings it onto the device, each chunk from
the fastest tier that holds it, in batched transfers, and promotes what came
from slower tiers; ``prefetch`` warms the host tier from disk ahead of time.

Only caches where slot == position (no eviction, the ``full`` policy) can be
stored or loaded: a chunk is the slot range of its tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from typing import Sequence

import jax
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.store import codec
from lmcache_jax.store.crypto import Cipher
from lmcache_jax.store.disk import DiskTier
from lmcache_jax.store.keys import chunk_keys, namespace
from lmcache_jax.store.layout import (Chunk, Layout, check_fits, insert_prefix,
                                      mark_prefix, slice_chunk, write_chunks)
from lmcache_jax.store.memory import device_sharding, host_sharding
from lmcache_jax.store.tier import MemoryTier, Tier, log


@dataclasses.dataclass
class Prefix:
  """A loaded prefix: its chunks on the device and the tier each came from."""
  num_tokens: int
  chunks: list[Chunk]
  sources: list[str]

  def tier_counts(self) -> dict[str, int]:
    return dict(collections.Counter(self.sources))


class KVStore:
  """Chunks of KV keyed by (model, layout, layer range, chunk size, tokens).

  Args:
    layout: the payload layout of the caches it serves (``Layout.of(cache)``).
    model_fingerprint: ``keys.model_fingerprint(lm)``; chunks of another
      model or dtype never match.
    chunk_size: tokens per chunk; must be a multiple of every leaf's group.
    device_bytes, host_bytes, disk_bytes: tier capacities; None leaves a
      tier out (disk also needs ``disk_dir``).
    policy: tier policy name from ``policies.tier`` (lru, lfu, fifo).
    cipher: encrypts the host and disk tiers (see ``crypto.load_cipher``).
    read_threads: threads reading and verifying disk chunks during a load
      (checksums run at about 0.5 GB/s a thread; default one per core).
    write_threads: background threads (disk writes, promotions, prefetch);
      default half the cores.
    group_bytes: chunks per batched transfer, in bytes.
  """

  def __init__(self, layout: Layout, *, model_fingerprint: bytes,
               chunk_size: int = 256, device_bytes: int | None = None,
               host_bytes: int | None = None, disk_dir: str | None = None,
               disk_bytes: int | None = None, policy: str = "lru",
               cipher: Cipher | None = None, device: jax.Device | None = None,
               read_threads: int | None = None,
               write_threads: int | None = None,
               group_bytes: int = 1 << 30):
    layout.check_chunk_size(chunk_size)
    if (disk_dir is None) != (disk_bytes is None):
      raise ValueError("the disk tier needs both disk_dir and disk_bytes; "
                       f"got disk_dir={disk_dir!r}, disk_bytes={disk_bytes!r}")
    self.layout = layout
    self.chunk_size = chunk_size
    self.cipher = cipher
    self.device = device or jax.devices()[0]
    self.root = namespace(model_fingerprint, layout.fingerprint(), chunk_size,
                          f"layers 0:{layout.num_layers}")
    self.expected = layout.chunk_shapes(chunk_size)
    self.chunk_nbytes = layout.chunk_nbytes(chunk_size)
    self.group_bytes = group_bytes
    self.tiers: dict[str, Tier] = {}
    if device_bytes is not None:
      self.tiers["device"] = MemoryTier("device", device_bytes, policy)
    if host_bytes is not None:
      self.tiers["host"] = MemoryTier("host", host_bytes, policy)
    if disk_dir is not None:
      self.tiers["disk"] = DiskTier(disk_dir, disk_bytes, policy, cipher)
    if not self.tiers:
      raise ValueError("a store needs at least one tier: give device_bytes, "
                       "host_bytes or disk_dir with disk_bytes")
    self.stats: collections.Counter = collections.Counter()
    self._stats_lock = threading.Lock()
    cores = os.cpu_count() or 4
    self._worker = concurrent.futures.ThreadPoolExecutor(
        write_threads or max(2, cores // 2), thread_name_prefix="kvstore-worker")
    self._readers = concurrent.futures.ThreadPoolExecutor(
        read_threads or cores, thread_name_prefix="kvstore-read")
    self._pending: set[concurrent.futures.Future] = set()
    self._pending_lock = threading.Lock()
    # keys whose disk write is queued but not done: held as far as store()
    # is concerned, so a second store() before the worker runs neither
    # writes nor counts them again
    self._disk_queued: set[bytes] = set()

  # -- keys ------------------------------------------------------------------

  def keys(self, tokens: Sequence[int], max_tokens: int | None = None):
    limit = None if max_tokens is None else max_tokens // self.chunk_size
    return chunk_keys(tokens, self.chunk_size, self.root, limit)

  def lookup(self, tokens: Sequence[int]) -> int:
    """Tokens of the longest prefix of ``tokens`` whose chunks are all stored."""
    hits = 0
    for key in self.keys(tokens):
      if not any(key in tier for tier in self.tiers.values()):
        break
      hits += 1
    return hits * self.chunk_size

  # -- store -----------------------------------------------------------------

  def store(self, tokens: Sequence[int], cache: KVCache, row: int = 0,
            wait: bool = False) -> int:
    """Writes the whole chunks of ``tokens`` held by sequence ``row`` of ``cache``.

    Chunks already in every tier are skipped. Device and host copies are
    made now; disk files are written by the background worker (``wait``
    blocks until they are). Returns the number of chunks copied.
    """
    if Layout.of(cache) != self.layout:
      raise ValueError("the cache's payload layout differs from the store's; "
                       "build the store for this cache's dtype and quantization")
    if not 0 <= row < cache.batch_size:
      raise ValueError(f"row {row} is outside the batch of {cache.batch_size}")
    held = min(len(tokens), int(cache.lengths[row]))
    todo = [(i, key) for i, key in enumerate(self.keys(tokens, held))
            if not self._held_everywhere(key)]
    if not todo:
      return 0
    # Last chunk first: under lru and fifo the head of a prefix, which every
    # longer prefix needs, is then the last to be evicted.
    todo.reverse()
    for group in self._groups(todo):
      self._store_group(cache, row, group)
    if wait:
      self.flush()
    self._count(stored=len(todo))
    return len(todo)

  def _held_everywhere(self, key: bytes) -> bool:
    """Whether every tier holds ``key`` (a queued disk write counts)."""
    with self._pending_lock:
      queued = key in self._disk_queued
    return all(key in tier or (name == "disk" and queued)
               for name, tier in self.tiers.items())

  def _groups(self, items: list) -> list[list]:
    """``items`` cut into runs of about ``group_bytes`` of chunks, which
    bounds the device memory a transfer holds and batches the small ones."""
    size = max(1, self.group_bytes // self.chunk_nbytes)
    return [items[i:i + size] for i in range(0, len(items), size)]

  def _store_group(self, cache: KVCache, row: int, todo: list) -> None:
    chunks = [slice_chunk(cache, self.layout, row, i * self.chunk_size,
                          self.chunk_size) for i, _ in todo]
    keys = [key for _, key in todo]
    if "device" in self.tiers:
      for key, chunk in zip(keys, chunks):
        self.tiers["device"].put(key, chunk, self.chunk_nbytes)
    host_copies = None
    if "host" in self.tiers:
      host_copies = self._put_host(keys, chunks)
    if "disk" in self.tiers:
      # The worker gets host copies, never device ones, so HBM is freed now.
      copies = host_copies or [
          tuple(np.asarray(a) for a in chunk) for chunk in chunks]
      with self._pending_lock:
        self._disk_queued.update(keys)
      self._submit(self._write_disk, keys, copies)

  def _put_host(self, keys: list[bytes], chunks: list[Chunk]) -> list:
    """Copies chunks to the host tier in one batched transfer; returns the
    host copies (arrays, or sealed bytes when encrypted)."""
    host = self.tiers["host"]
    if self.cipher is not None:
      blobs = [codec.encode(key, [np.asarray(a) for a in chunk], self.cipher)
               for key, chunk in zip(keys, chunks)]
      for key, blob in zip(keys, blobs):
        host.put(key, blob, len(blob))
      return blobs
    flat = [a for chunk in chunks for a in chunk]
    moved = jax.device_put(flat, host_sharding(self.device))
    width = len(self.layout.leaves)
    copies = [tuple(moved[i * width:(i + 1) * width]) for i in range(len(keys))]
    for key, copy in zip(keys, copies):
      host.put(key, copy, self.chunk_nbytes)
    return copies

  def _write_disk(self, keys: list[bytes], copies: list) -> None:
    disk = self.tiers["disk"]
    try:
      for key, copy in zip(keys, copies):
        if key in disk:
          continue
        blob = copy if isinstance(copy, bytes) else codec.encode(
            key, [np.asarray(a) for a in copy], self.cipher)
        disk.put(key, blob, len(blob))
    finally:   # written, refused or failed: a later store() decides again
      with self._pending_lock:
        self._disk_queued.difference_update(keys)

  # -- load ------------------------------------------------------------------

  def load(self, tokens: Sequence[int], n: int | None = None) -> Prefix:
    """The stored KV of up to the first ``n`` tokens, on the device.

    Stops at the first chunk that is missing or fails its checks (a damaged
    chunk is dropped), so the prefix may be shorter than ``lookup`` said;
    the caller recomputes the rest. ``load_into`` streams into a cache
    instead, holding less device memory.
    """
    keys, found, sources = self._gather(tokens, n)
    chunks = []
    for group in self._groups(list(range(len(found)))):
      chunks += self._to_device([found[i] for i in group],
                                [sources[i] for i in group])
    self._after_load(keys, chunks, found, sources)
    return Prefix(len(chunks) * self.chunk_size, chunks, sources)

  def load_into(self, cache: KVCache, row: int, tokens: Sequence[int],
                n: int | None = None) -> tuple[KVCache, Prefix]:
    """Loads the stored prefix of ``tokens`` (up to ``n``) into the empty
    sequence ``row`` of ``cache`` (donated), a group of chunks at a time.

    Returns the cache and the prefix (without its chunks).
    """
    keys, found, sources = self._gather(tokens, n)
    check_fits(cache, self.layout, len(found) * self.chunk_size)
    # Committed to the device whatever the hit, so the jitted steps that
    # follow see one kind of input and compile once.
    cache = jax.device_put(cache, device_sharding(self.device))
    first = 0
    for group in self._groups(list(range(len(found)))):
      chunks = self._to_device([found[i] for i in group],
                               [sources[i] for i in group])
      cache = write_chunks(cache, self.layout, row, first, chunks,
                           self.chunk_size)
      if "device" in self.tiers:
        self._promote_device(keys[first:first + len(group)], chunks,
                             sources[first:first + len(group)])
      first += len(group)
    cache = mark_prefix(cache, row, len(found) * self.chunk_size)
    self._after_load(keys, None, found, sources)
    return cache, Prefix(len(found) * self.chunk_size, [], sources)

  def _gather(self, tokens, n):
    """Keys, and per chunk of the longest intact stored prefix its value in
    the fastest tier holding it (device chunk, host copy, or verified leaves
    read from disk in parallel), and that tier's name."""
    keys = self.keys(tokens, n)
    found: list = []
    sources: list[str] = []
    for key in keys:
      source, value = self._fast_get(key)
      if value is None:
        if "disk" not in self.tiers or key not in self.tiers["disk"]:
          break
        source = "disk"
        value = self._readers.submit(self.tiers["disk"].read_chunk, key,
                                     self.expected)
      found.append(value)
      sources.append(source)
    for i, value in enumerate(found):
      if isinstance(value, concurrent.futures.Future):
        found[i] = value.result()
      if found[i] is None:
        for later in found[i + 1:]:
          if isinstance(later, concurrent.futures.Future):
            later.cancel()
        found, sources = found[:i], sources[:i]
        self._count(dropped=1)
        break
    return keys[:len(found)], found, sources

  def _after_load(self, keys, chunks, found, sources) -> None:
    """Refreshes the hits (head of the prefix most recent) and promotes."""
    for tier in self.tiers.values():
      tier.touch(keys[::-1])
    if chunks is not None and "device" in self.tiers:
      self._promote_device(keys, chunks, sources)
    from_disk = [(key, leaves) for key, leaves, source
                 in reversed(list(zip(keys, found, sources))) if source == "disk"]
    if from_disk and "host" in self.tiers:
      self._submit(self._promote_host, from_disk)
    for source in sources:
      self._count(**{f"hit_{source}": 1})

  def _promote_device(self, keys, chunks, sources) -> None:
    for key, chunk, source in reversed(list(zip(keys, chunks, sources))):
      if source != "device":
        self.tiers["device"].put(key, chunk, self.chunk_nbytes)

  def _fast_get(self, key: bytes):
    for name in ("device", "host"):
      tier = self.tiers.get(name)
      value = None if tier is None else tier.get(key)
      if value is None:
        continue
      if name == "host" and self.cipher is not None:
        try:
          value = codec.decode(value, key, self.expected, self.cipher)
        except codec.CorruptChunk as e:
          log.warning("host tier: dropped damaged chunk %s: %s",
                      key.hex()[:16], e)
          tier.drop(key)
          continue
      return name, value
    return None, None

  def _to_device(self, found: list, sources: list[str]) -> list[Chunk]:
    """Moves every non-device chunk in one batched ``device_put``."""
    width = len(self.layout.leaves)
    moving = [i for i, s in enumerate(sources) if s != "device"]
    flat = [a for i in moving for a in found[i]]
    moved = jax.device_put(flat, device_sharding(self.device)) if flat else []
    chunks = list(found)
    for j, i in enumerate(moving):
      chunks[i] = tuple(moved[j * width:(j + 1) * width])
    return chunks

  def _promote_host(self, items) -> None:
    host = self.tiers["host"]
    if self.cipher is not None:
      for key, leaves in items:
        blob = codec.encode(key, leaves, self.cipher)
        host.put(key, blob, len(blob))
      return
    keys = [key for key, _ in items]
    self._put_host(keys, [tuple(leaves) for _, leaves in items])

  def insert(self, cache: KVCache, row: int, prefix: Prefix) -> KVCache:
    """``cache`` with a loaded ``prefix`` as the first tokens of empty sequence ``row``."""
    return insert_prefix(cache, self.layout, row, prefix.chunks, self.chunk_size)

  # -- background work ---------------------------------------------------------

  def prefetch(self, tokens: Sequence[int]) -> concurrent.futures.Future:
    """Brings the stored prefix of ``tokens`` from disk into the host tier.

    Returns a future of the number of prefix chunks then in memory tiers.
    """
    return self._submit(self._prefetch, list(tokens))

  def _prefetch(self, tokens: list[int]) -> int:
    fast = [self.tiers[n] for n in ("device", "host") if n in self.tiers]
    disk = self.tiers.get("disk")
    items, ready = [], 0
    for key in self.keys(tokens):
      if any(key in tier for tier in fast):
        ready += 1
        continue
      leaves = disk.read_chunk(key, self.expected) if disk else None
      if leaves is None:
        break
      items.append((key, leaves))
      ready += 1
    items.reverse()
    if items and "host" in self.tiers:
      self._promote_host(items)
    elif items and "device" in self.tiers:
      moved = self._to_device([leaves for _, leaves in items],
                              ["disk"] * len(items))
      for (key, _), chunk in zip(items, moved):
        self.tiers["device"].put(key, chunk, self.chunk_nbytes)
    return ready

  def _submit(self, fn, *args) -> concurrent.futures.Future:
    future = self._worker.submit(self._guarded, fn, *args)
    with self._pending_lock:
      self._pending.add(future)
    future.add_done_callback(self._done)
    return future

  def _guarded(self, fn, *args):
    try:
      return fn(*args)
    except Exception:  # A background failure must not take the run down.
      log.exception("store: background %s failed", fn.__name__)
      return None

  def _done(self, future) -> None:
    with self._pending_lock:
      self._pending.discard(future)

  def flush(self) -> None:
    """Waits for every background write, promotion and prefetch so far."""
    while True:
      with self._pending_lock:
        pending = list(self._pending)
      if not pending:
        return
      concurrent.futures.wait(pending)

  def close(self) -> None:
    self.flush()
    self._worker.shutdown()
    self._readers.shutdown()

  def _count(self, **counts) -> None:
    with self._stats_lock:
      self.stats.update(counts)

  def describe(self) -> str:
    parts = [f"{name}: {len(t)} chunks, {t.used / 2**20:.1f}/"
             f"{t.capacity / 2**20:.1f} MiB ({t.policy_name})"
             for name, t in self.tiers.items()]
    return (f"KVStore(chunk={self.chunk_size} tokens, "
            f"{self.chunk_nbytes / 2**20:.2f} MiB/chunk; " + "; ".join(parts)
            + (", encrypted" if self.cipher else "") + ")")
