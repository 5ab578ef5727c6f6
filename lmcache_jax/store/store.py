"""The prefix store: chunked KV in an ordered list of tiers, reused across requests.

``store`` writes a sequence's new whole chunks through to every tier;
``lookup`` finds the longest prefix of stored chunks; ``load`` brings it onto
the device, each chunk from the fastest tier holding an intact copy, in
batched transfers, and promotes it into the faster tiers; ``prefetch`` warms
the memory tiers from the storage tiers ahead of time.

How the store treats a tier follows from its ``sharding(device)``:
  memory tier (a sharding)   written during ``store``; holds the chunk's
                             arrays there, or sealed bytes when the store has
                             a cipher and the sharding is not the device's own
                             memory
  storage tier (None)        holds encoded chunks (checksummed, or sealed),
                             written by a background pool
Every chunk held as bytes is checked (key, length, checksum or tag, layout)
when read; a damaged copy is dropped and the next tier is tried.

Only caches where slot == position (no eviction, the ``full`` policy) can be
stored or loaded: a chunk is the slot range of its tokens.

A store is a context manager: ``close`` (or leaving the ``with`` block)
finishes the background writes and releases its tiers (the disk tier's
directory lock), so a store should be closed by whoever made it.
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
from lmcache_jax.store.keys import chunk_keys, namespace
from lmcache_jax.store.layout import (Chunk, Layout, check_fits, check_layout,
                                      insert_prefix, mark_prefix, slice_chunk,
                                      write_chunks)
from lmcache_jax.store.memory import device_sharding
from lmcache_jax.store.tier import Tier, log


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
    tiers: the tiers, fastest first (e.g. ``DeviceTier``, ``HostTier``,
      ``DiskTier``), each with its own name and replacement rule; the
      store owns them (``close`` closes them).
    model_fingerprint: ``keys.model_fingerprint(lm)``; chunks of another
      model or dtype never match.
    chunk_size: tokens per chunk; must be a multiple of every leaf's group.
    cipher: seals every chunk that leaves the device (see
      ``crypto.load_cipher``).
    device: where loaded chunks go (default the first device).
    read_threads: threads reading and verifying stored bytes during a load
      (checksums run at about 0.5 GB/s a thread; default one per core).
    write_threads: background threads (storage writes, promotions,
      prefetch); default half the cores.
    group_bytes: chunks per batched transfer, in bytes.

  ``stats`` counts ``stored`` (chunks a tier took that lacked them, now or
  in the background), ``write_failed`` (chunk writes a tier failed; each
  first failure of a kind is logged: a store is a cache, so a failed write
  costs a later miss, never the request), ``dropped`` and ``hit_<tier>``.
  """

  def __init__(self, layout: Layout, tiers: Sequence[Tier], *,
               model_fingerprint: bytes, chunk_size: int = 256,
               cipher: Cipher | None = None, device: jax.Device | None = None,
               read_threads: int | None = None,
               write_threads: int | None = None,
               group_bytes: int = 1 << 30):
    layout.check_chunk_size(chunk_size)
    self.tiers = _check_tiers(tiers)
    self.layout = layout
    self.chunk_size = chunk_size
    self.cipher = cipher
    self.device = device or jax.devices()[0]
    self.root = namespace(model_fingerprint, layout.fingerprint(), chunk_size,
                          f"layers 0:{layout.num_layers}")
    self.expected = layout.chunk_shapes(chunk_size)
    self.chunk_nbytes = layout.chunk_nbytes(chunk_size)
    self.group_bytes = group_bytes
    self._on_device = device_sharding(self.device)
    # per tier name: where its arrays go, or None: it holds encoded bytes
    self._target: dict[str, jax.sharding.Sharding | None] = {}
    self._rank = {tier.name: i for i, tier in enumerate(self.tiers)}
    self._memory, self._storage = [], []
    self._check_keys(cipher)
    for tier in self.tiers:
      sharding = tier.sharding(self.device)
      (self._storage if sharding is None else self._memory).append(tier)
      sealed = cipher is not None and sharding != self._on_device
      self._target[tier.name] = None if sealed else sharding
    self.stats: collections.Counter = collections.Counter()
    self._stats_lock = threading.Lock()
    cores = os.cpu_count() or 4
    self._worker = concurrent.futures.ThreadPoolExecutor(
        write_threads or max(2, cores // 2), thread_name_prefix="kvstore-worker")
    self._readers = concurrent.futures.ThreadPoolExecutor(
        read_threads or cores, thread_name_prefix="kvstore-read")
    self._pending: set[concurrent.futures.Future] = set()
    self._pending_lock = threading.Lock()
    # keys whose storage writes are queued but not done: held as far as
    # store() is concerned, so a second store() before the worker runs
    # neither writes nor counts them again
    self._queued: set[bytes] = set()
    self._reported: set[tuple[str, int | None]] = set()
    self._closed = False

  def _check_keys(self, cipher: Cipher | None) -> None:
    """Each tier's check of the key; a refusal closes the tiers (the store
    owns them) before it propagates."""
    try:
      for tier in self.tiers:
        tier.check_key(cipher.key_check if cipher else None)
    except BaseException:
      for tier in self.tiers:
        tier.close()
      raise

  def __enter__(self) -> "KVStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def tier(self, name: str) -> Tier:
    """The tier called ``name``."""
    for tier in self.tiers:
      if tier.name == name:
        return tier
    raise ValueError(f"the store has no tier {name!r}; its tiers: "
                     f"{', '.join(t.name for t in self.tiers)}")

  # -- keys ------------------------------------------------------------------

  def keys(self, tokens: Sequence[int], max_tokens: int | None = None):
    limit = None if max_tokens is None else max_tokens // self.chunk_size
    return chunk_keys(tokens, self.chunk_size, self.root, limit)

  def lookup(self, tokens: Sequence[int]) -> int:
    """Tokens of the longest prefix of ``tokens`` whose chunks are all stored."""
    hits = 0
    for key in self.keys(tokens):
      if not any(key in tier for tier in self.tiers):
        break
      hits += 1
    return hits * self.chunk_size

  # -- store -----------------------------------------------------------------

  def store(self, tokens: Sequence[int], cache: KVCache, row: int = 0,
            wait: bool = False) -> int:
    """Writes the whole chunks of ``tokens`` held by sequence ``row`` of ``cache``.

    Chunks already in every tier are skipped. Memory tiers get their copies
    now; storage tiers are written by the background worker (``wait``
    blocks until they are). Returns the number of chunks written into a
    tier that lacked them: with ``wait``, exactly those; without, also
    those queued for the storage tiers, whose writes may still fail. A
    failed write is logged and counted in ``stats['write_failed']``;
    ``stats['stored']`` counts only chunks written.
    """
    self._check_open()
    check_layout(cache, self.layout)
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
    written, writes = set(), []
    for group in self._groups(todo):
      now, later = self._store_group(cache, row, group)
      written |= now
      writes += [later] if later is not None else []
    self._count(stored=len(written))
    if not wait:
      return len(todo) if writes else len(written)
    for future in writes:
      written |= future.result() or set()
    return len(written)

  def _held_everywhere(self, key: bytes) -> bool:
    """Whether every tier holds ``key`` (a queued storage write counts)."""
    with self._pending_lock:
      queued = key in self._queued
    return all(key in tier for tier in self._memory) and (
        queued or all(key in tier for tier in self._storage))

  def _groups(self, items: list) -> list[list]:
    """``items`` cut into runs of about ``group_bytes`` of chunks, which
    bounds the device memory a transfer holds and batches the small ones."""
    size = max(1, self.group_bytes // self.chunk_nbytes)
    return [items[i:i + size] for i in range(0, len(items), size)]

  def _store_group(self, cache: KVCache, row: int, todo: list):
    """Copies a group of chunks into the memory tiers and queues the storage
    writes. Returns the keys written now, and the future of the keys the
    storage tiers will write (None if there is none)."""
    chunks = [slice_chunk(cache, self.layout, row, i * self.chunk_size,
                          self.chunk_size) for i, _ in todo]
    keys = [key for _, key in todo]
    copies = None  # copies off the device, for the storage tiers
    written = set()
    for tier in self._memory:
      fresh = [key not in tier for key in keys]
      made, took = self._put(tier, keys, chunks)
      written |= {key for key, new, ok in zip(keys, fresh, took) if new and ok}
      if self._target[tier.name] != self._on_device:
        copies = made
    if not self._storage:
      return written, None
    # The worker gets copies off the device, never device ones, so HBM is
    # freed now.
    copies = copies or [tuple(np.asarray(a) for a in chunk) for chunk in chunks]
    with self._pending_lock:
      self._queued.update(keys)
    return written, self._submit(self._write_storage, keys, copies,
                                 frozenset(written))

  def _put(self, tier: Tier, keys: list[bytes], chunks: list):
    """Puts chunks (arrays anywhere) into ``tier`` in its form: arrays moved
    in one batched transfer, or encoded bytes. Returns what it put, and per
    chunk whether the tier holds it now."""
    target = self._target[tier.name]
    if target is None:
      copies = [self._encode(key, chunk) for key, chunk in zip(keys, chunks)]
      sizes = [len(blob) for blob in copies]
    else:
      width = len(self.layout.leaves)
      moved = jax.device_put([a for chunk in chunks for a in chunk], target)
      copies = [tuple(moved[i * width:(i + 1) * width])
                for i in range(len(keys))]
      sizes = [self.chunk_nbytes] * len(keys)
    took = [self._put_one(tier, key, copy, size)
            for key, copy, size in zip(keys, copies, sizes)]
    return copies, took

  def _put_one(self, tier: Tier, key: bytes, value, nbytes: int) -> bool:
    """``tier.put``; a failed write is counted and logged, and is False."""
    try:
      return tier.put(key, value, nbytes)
    except OSError as e:
      self._write_failed(tier, e)
      return False

  def _encode(self, key: bytes, chunk) -> bytes:
    if isinstance(chunk, bytes):  # already encoded (a sealed memory copy)
      return chunk
    return codec.encode(key, [np.asarray(a) for a in chunk], self.cipher)

  def _write_storage(self, keys: list[bytes], copies: list,
                     counted: frozenset = frozenset()) -> set[bytes]:
    """Writes chunks to the storage tiers lacking them; returns the keys
    written to one. ``counted``: keys already counted as stored."""
    written = set()
    try:
      blobs: dict[bytes, bytes] = {}
      for tier in self._storage:
        for key, copy in zip(keys, copies):
          if key in tier:
            continue
          if key not in blobs:
            blobs[key] = self._encode(key, copy)
          if self._put_one(tier, key, blobs[key], len(blobs[key])):
            written.add(key)
    finally:   # written, refused or failed: a later store() decides again
      with self._pending_lock:
        self._queued.difference_update(keys)
    self._count(stored=len(written - counted))
    return written

  def _write_failed(self, tier: Tier, error: OSError) -> None:
    """Counts a failed write; logs the first of each tier and kind."""
    self._count(write_failed=1)
    with self._stats_lock:
      first = (tier.name, error.errno) not in self._reported
      self._reported.add((tier.name, error.errno))
    if first:
      log.warning("%s tier: cannot write a chunk (%s); serving from the other "
                  "tiers", tier.name, error.strerror or error)

  # -- load ------------------------------------------------------------------

  def load(self, tokens: Sequence[int], n: int | None = None) -> Prefix:
    """The stored KV of up to the first ``n`` tokens, on the device.

    Stops at the first chunk that is missing or whose every copy fails its
    checks (a damaged copy is dropped), so the prefix may be shorter than
    ``lookup`` said; the caller recomputes the rest. ``load_into`` streams
    into a cache instead, holding less device memory.
    """
    self._check_open()
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
    self._check_open()
    keys, found, sources = self._gather(tokens, n)
    check_fits(cache, self.layout, len(found) * self.chunk_size)
    # Committed to the device whatever the hit, so the jitted steps that
    # follow see one kind of input and compile once.
    cache = jax.device_put(cache, self._on_device)
    first = 0
    for group in self._groups(list(range(len(found)))):
      chunks = self._to_device([found[i] for i in group],
                               [sources[i] for i in group])
      cache = write_chunks(cache, self.layout, row, first, chunks,
                           self.chunk_size)
      self._promote_on_device(keys[first:first + len(group)], chunks,
                              sources[first:first + len(group)])
      first += len(group)
    cache = mark_prefix(cache, row, len(found) * self.chunk_size)
    self._after_load(keys, None, found, sources)
    return cache, Prefix(len(found) * self.chunk_size, [], sources)

  def _gather(self, tokens, n):
    """Keys, and per chunk of the longest intact stored prefix its value in
    the fastest tier holding it (arrays, or verified leaves read from bytes
    in parallel), and that tier's name."""
    keys = self.keys(tokens, n)
    found: list = []
    for key in keys:
      for i, tier in enumerate(self.tiers):
        if key not in tier:
          continue
        if self._target[tier.name] is None:
          found.append(self._readers.submit(self._read_intact, key,
                                            self.tiers[i:]))
          break
        value = tier.get(key)
        if value is not None:
          found.append((tier.name, value))
          break
      else:
        break
    for i, item in enumerate(found):
      if isinstance(item, concurrent.futures.Future):
        found[i] = item.result()
      if found[i] is None:
        for later in found[i + 1:]:
          if isinstance(later, concurrent.futures.Future):
            later.cancel()
        found = found[:i]
        self._count(dropped=1)
        break
    return (keys[:len(found)], [value for _, value in found],
            [name for name, _ in found])

  def _read_intact(self, key: bytes, tiers) -> tuple[str, object] | None:
    """(tier name, value) of the first of ``tiers`` holding an intact copy
    of ``key``; bytes are decoded to leaves, and a damaged copy is dropped."""
    for tier in tiers:
      value = tier.get(key)
      if value is None:
        continue
      if self._target[tier.name] is not None:
        return tier.name, value
      try:
        return tier.name, codec.decode(value, key, self.expected, self.cipher)
      except codec.CorruptChunk as e:
        log.warning("%s tier: dropped damaged chunk %s: %s", tier.name,
                    key.hex()[:16], e)
        tier.drop(key)
    return None

  def _after_load(self, keys, chunks, found, sources) -> None:
    """Refreshes the hits (head of the prefix most recent) and promotes each
    chunk into the tiers faster than its source: those on the device now,
    the others in the background."""
    for tier in self.tiers:
      tier.touch(keys[::-1])
    if chunks is not None:
      self._promote_on_device(keys, chunks, sources)
    items = list(zip(keys, found, sources))[::-1]
    for tier in self.tiers:
      if self._target[tier.name] == self._on_device:
        continue
      rank = self._rank[tier.name]
      todo = [(key, value) for key, value, source in items
              if self._rank[source] > rank]
      if todo:
        self._submit(self._put, tier, [key for key, _ in todo],
                     [value for _, value in todo])
    for source in sources:
      self._count(**{f"hit_{source}": 1})

  def _promote_on_device(self, keys, chunks, sources) -> None:
    """Puts loaded device chunks into the faster tiers on the device."""
    for tier in self.tiers:
      if self._target[tier.name] != self._on_device:
        continue
      rank = self._rank[tier.name]
      for key, chunk, source in reversed(list(zip(keys, chunks, sources))):
        if self._rank[source] > rank:
          tier.put(key, chunk, self.chunk_nbytes)

  def _to_device(self, found: list, sources: list[str]) -> list[Chunk]:
    """Moves every chunk not already on the device in one ``device_put``."""
    width = len(self.layout.leaves)
    moving = [i for i, s in enumerate(sources)
              if self._target[s] != self._on_device]
    flat = [a for i in moving for a in found[i]]
    moved = jax.device_put(flat, self._on_device) if flat else []
    chunks = list(found)
    for j, i in enumerate(moving):
      chunks[i] = tuple(moved[j * width:(j + 1) * width])
    return chunks

  def insert(self, cache: KVCache, row: int, prefix: Prefix) -> KVCache:
    """``cache`` with a loaded ``prefix`` as the first tokens of empty sequence ``row``."""
    return insert_prefix(cache, self.layout, row, prefix.chunks, self.chunk_size)

  # -- background work ---------------------------------------------------------

  def prefetch(self, tokens: Sequence[int]) -> concurrent.futures.Future:
    """Brings the stored prefix of ``tokens`` from the storage tiers into the
    slowest memory tier (host memory, which has the most room).

    Returns a future of the number of leading chunks found intact (then in
    a memory tier, where the store has one).
    """
    self._check_open()
    return self._submit(self._prefetch, list(tokens))

  def _prefetch(self, tokens: list[int]) -> int:
    items, ready = [], 0
    for key in self.keys(tokens):
      if any(key in tier for tier in self._memory):
        ready += 1
        continue
      got = self._read_intact(key, self._storage)
      if got is None:
        break
      items.append((key, got[1]))
      ready += 1
    items.reverse()
    if items and self._memory:
      self._put(self._memory[-1], [key for key, _ in items],
                [leaves for _, leaves in items])
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
    """Finishes the background work and releases the tiers; a closed store
    refuses further use. Closing twice does nothing."""
    if self._closed:
      return
    self.flush()
    self._closed = True
    self._worker.shutdown()
    self._readers.shutdown()
    for tier in self.tiers:
      tier.close()

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError("the store is closed; make a new one")

  def _count(self, **counts) -> None:
    with self._stats_lock:
      self.stats.update(counts)

  def describe(self) -> str:
    parts = [f"{t.name}: {len(t)} chunks, {t.used / 2**20:.1f}/"
             f"{t.capacity / 2**20:.1f} MiB ({t.replacement.name})"
             for t in self.tiers]
    return (f"KVStore(chunk={self.chunk_size} tokens, "
            f"{self.chunk_nbytes / 2**20:.2f} MiB/chunk; " + "; ".join(parts)
            + (", encrypted" if self.cipher else "") + ")")


def _check_tiers(tiers: Sequence[Tier]) -> tuple[Tier, ...]:
  tiers = tuple(tiers)
  if not tiers:
    raise ValueError("a store needs at least one tier, e.g. "
                     "[HostTier(capacity, replacement)]; got none")
  for tier in tiers:
    if not isinstance(tier, Tier):
      raise ValueError(f"a store's tiers must be Tier objects (DeviceTier, "
                       f"HostTier, DiskTier, ...), got {tier!r}")
  names = [tier.name for tier in tiers]
  for name in names:
    if names.count(name) > 1:
      raise ValueError(f"the store's tiers {names} name {name!r} twice; each "
                       f"tier needs a name of its own")
  rules = {}
  for tier in tiers:
    other = rules.setdefault(id(tier.replacement), tier.name)
    if other != tier.name:
      raise ValueError(f"the {other} and {tier.name} tiers share one "
                       f"replacement rule object; give each tier its own")
  return tiers
