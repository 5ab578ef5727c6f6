"""A storage tier: a bounded map from chunk key to chunk, evicting by a replacement rule.

A subclass says where a chunk lives (``_write``, ``_read``, ``_delete``) and,
for a memory tier, in which memory its arrays go (``sharding``); the base
class keeps the byte accounting and the replacement rule under one lock, so
many threads may use a tier at once. What a tier holds (arrays, or encoded
bytes that the store checks on every read) follows from ``sharding``; see
``store.KVStore``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Hashable, Protocol

import jax

log = logging.getLogger("lmcache_jax.store")


class Replacement(Protocol):
  """Bookkeeping of one tier's keys that names the next victim.

  A tier calls ``insert`` when a chunk arrives, ``touch`` on every hit,
  ``remove`` when a chunk leaves for any reason, and ``victim`` when it needs
  room. Rules are not thread-safe (the tier holds its lock around them), so
  each tier needs its own.
  """
  name: str

  def insert(self, key: Hashable) -> None: ...

  def touch(self, key: Hashable) -> None: ...

  def remove(self, key: Hashable) -> None: ...

  def victim(self) -> Hashable:
    """The key to evict next; only called while at least one key is held."""


_RULE_METHODS = ("insert", "touch", "remove", "victim")


class Tier:
  """A storage level of the store. Subclasses set ``name`` (unique in a store;
  it names the tier in stats, logs and ``Prefix.sources``) and implement
  ``_write``, ``_read`` and ``_delete``.

  Args:
    capacity: bytes the tier may hold (positive).
    replacement: the rule choosing victims when it is full (its own object).
  """
  name = "tier"

  def __init__(self, capacity: int, replacement: Replacement):
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"the {self.name} tier's capacity must be a positive "
                       f"number of bytes, got {capacity!r}; leave the tier "
                       f"out of the store to disable it")
    missing = [m for m in _RULE_METHODS
               if not callable(getattr(replacement, m, None))]
    if missing or not isinstance(getattr(replacement, "name", None), str):
      raise ValueError(f"the {self.name} tier's replacement must be a rule "
                       f"object with a name and {', '.join(_RULE_METHODS)} "
                       f"(e.g. lru), got {replacement!r}")
    self.capacity = capacity
    self.replacement = replacement
    self._sizes: dict[bytes, int] = {}
    self._lock = threading.RLock()
    self.used = 0
    self.evictions = 0

  def sharding(self, device: jax.Device) -> jax.sharding.Sharding | None:
    """Where a memory tier keeps chunks as arrays, for the store's ``device``.

    None (the default) makes a storage tier: it keeps encoded chunks
    (``bytes``), written by the store's background pool and checked on
    every read.
    """
    del device
    return None

  def check_key(self, key_check: str | None) -> None:
    """Called once by each store that takes this tier, with the check value
    of its encryption key (None: not encrypted). A tier that keeps chunks
    across runs records it and refuses a store with another key."""
    del key_check

  def __contains__(self, key: bytes) -> bool:
    with self._lock:
      return key in self._sizes

  def __len__(self) -> int:
    with self._lock:
      return len(self._sizes)

  def close(self) -> None:
    """Releases what the tier holds outside this process (files, locks)."""

  def put(self, key: bytes, value: Any, nbytes: int) -> bool:
    """Stores ``value`` unless present; evicts to make room. False if it
    cannot fit; a failed write raises (``OSError``) and indexes nothing.

    The chunk is written before it is indexed, so a reader never finds a key
    whose chunk is still on its way.
    """
    if nbytes > self.capacity:
      return False
    with self._lock:
      if key in self._sizes:
        self.replacement.touch(key)
        return True
    self._write(key, value)
    victims = []
    with self._lock:
      if key in self._sizes:
        return True
      while self.used + nbytes > self.capacity:
        victim = self.replacement.victim()
        victims.append(victim)
        self._forget(victim)
        self.evictions += 1
      self._sizes[key] = nbytes
      self.used += nbytes
      self.replacement.insert(key)
    for victim in victims:
      self._delete(victim)
    return True

  def get(self, key: bytes) -> Any | None:
    """The chunk, or None if absent or unreadable (then it is dropped)."""
    with self._lock:
      if key not in self._sizes:
        return None
      self.replacement.touch(key)
    value = self._read(key)
    if value is None:
      self.drop(key)
    return value

  def touch(self, keys: list[bytes]) -> None:
    """Counts a hit on each key, in this order."""
    with self._lock:
      for key in keys:
        if key in self._sizes:
          self.replacement.touch(key)

  def drop(self, key: bytes) -> None:
    with self._lock:
      held = key in self._sizes
      self._forget(key)
    if held:
      self._delete(key)

  def _forget(self, key: bytes) -> None:
    size = self._sizes.pop(key, None)
    if size is not None:
      self.used -= size
      self.replacement.remove(key)

  def _index(self, key: bytes, nbytes: int) -> None:
    """Records a chunk already in place (e.g. a file found at start)."""
    with self._lock:
      self._sizes[key] = nbytes
      self.used += nbytes
      self.replacement.insert(key)

  def _write(self, key: bytes, value: Any) -> None:
    """Puts ``value`` where the tier keeps chunks; raises if it cannot."""
    raise NotImplementedError

  def _read(self, key: bytes) -> Any | None:
    """The value written for ``key``, or None if it cannot be read."""
    raise NotImplementedError

  def _delete(self, key: bytes) -> None:
    """Removes ``key``'s value, unless ``key`` was indexed again meanwhile."""
    raise NotImplementedError


class MemoryTier(Tier):
  """Chunks held as Python objects in this process (arrays, or sealed bytes)."""

  def __init__(self, capacity: int, replacement: Replacement):
    super().__init__(capacity, replacement)
    self._values: dict[bytes, Any] = {}

  def _write(self, key: bytes, value: Any) -> None:
    with self._lock:
      self._values[key] = value

  def _read(self, key: bytes) -> Any | None:
    with self._lock:
      return self._values.get(key)

  def _delete(self, key: bytes) -> None:
    with self._lock:
      if key not in self._sizes:
        self._values.pop(key, None)
