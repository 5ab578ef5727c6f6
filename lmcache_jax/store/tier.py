"""A tier: a bounded map from chunk key to chunk, evicting by a named tier policy.

Subclasses say where a chunk lives (``_write``, ``_read``, ``_delete``); the
base class keeps the byte accounting and the policy under one lock, so many
threads may use a tier at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from policies.registry import TIER

log = logging.getLogger("lmcache_jax.store")


class Tier:
  name = "tier"

  def __init__(self, capacity: int, policy: str = "lru"):
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"the {self.name} tier's capacity must be a positive "
                       f"number of bytes, got {capacity!r}; leave the tier "
                       f"out of the store to disable it")
    self.capacity = capacity
    self.policy_name = policy
    self._policy = TIER.make(policy)
    self._sizes: dict[bytes, int] = {}
    self._lock = threading.RLock()
    self.used = 0
    self.evictions = 0

  def __contains__(self, key: bytes) -> bool:
    with self._lock:
      return key in self._sizes

  def __len__(self) -> int:
    with self._lock:
      return len(self._sizes)

  def put(self, key: bytes, value: Any, nbytes: int) -> bool:
    """Stores ``value`` unless present; evicts to make room. False if it cannot fit.

    The chunk is written before it is indexed, so a reader never finds a key
    whose chunk is still on its way.
    """
    if nbytes > self.capacity:
      return False
    with self._lock:
      if key in self._sizes:
        self._policy.touch(key)
        return True
    if not self._write(key, value):
      return False
    victims = []
    with self._lock:
      if key in self._sizes:
        return True
      while self.used + nbytes > self.capacity:
        victim = self._policy.victim()
        victims.append(victim)
        self._forget(victim)
        self.evictions += 1
      self._sizes[key] = nbytes
      self.used += nbytes
      self._policy.insert(key)
    for victim in victims:
      self._delete(victim)
    return True

  def get(self, key: bytes) -> Any | None:
    """The chunk, or None if absent or found damaged (then it is dropped)."""
    with self._lock:
      if key not in self._sizes:
        return None
      self._policy.touch(key)
    value = self._read(key)
    if value is None:
      self.drop(key)
    return value

  def touch(self, keys: list[bytes]) -> None:
    """Counts a hit on each key, in this order."""
    with self._lock:
      for key in keys:
        if key in self._sizes:
          self._policy.touch(key)

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
      self._policy.remove(key)

  def _index(self, key: bytes, nbytes: int) -> None:
    """Records a chunk already in place (a file found on disk at start)."""
    with self._lock:
      self._sizes[key] = nbytes
      self.used += nbytes
      self._policy.insert(key)

  def _write(self, key: bytes, value: Any) -> bool:
    raise NotImplementedError

  def _read(self, key: bytes) -> Any | None:
    raise NotImplementedError

  def _delete(self, key: bytes) -> None:
    raise NotImplementedError


class MemoryTier(Tier):
  """Chunks held as Python objects (device arrays, pinned host arrays, bytes)."""

  def __init__(self, name: str, capacity: int, policy: str = "lru"):
    self.name = name
    super().__init__(capacity, policy)
    self._values: dict[bytes, Any] = {}

  def _write(self, key: bytes, value: Any) -> bool:
    with self._lock:
      self._values[key] = value
    return True

  def _read(self, key: bytes) -> Any | None:
    with self._lock:
      return self._values.get(key)

  def _delete(self, key: bytes) -> None:
    with self._lock:
      if key not in self._sizes:
        self._values.pop(key, None)
