"""``lru``: evict the chunk whose last hit is oldest (LMCache's default)."""

from __future__ import annotations

import collections
from typing import Hashable

from lmcache_jax.store.tier import Replacement
from policies.registry import REPLACEMENT


@REPLACEMENT.register("lru")
class LRU(Replacement):
  """Least recently used: a hit moves the chunk to the back of the queue."""
  name = "lru"

  def __init__(self):
    self._order: collections.OrderedDict = collections.OrderedDict()

  def insert(self, key: Hashable) -> None:
    self._order[key] = None
    self._order.move_to_end(key)

  def touch(self, key: Hashable) -> None:
    if key in self._order:
      self._order.move_to_end(key)

  def remove(self, key: Hashable) -> None:
    self._order.pop(key, None)

  def victim(self) -> Hashable:
    return next(iter(self._order))
