"""``fifo``: evict the chunk that arrived first, whatever its hits."""

from __future__ import annotations

import collections
from typing import Hashable

from lmcache_jax.store.tier import Replacement
from policies.registry import REPLACEMENT


@REPLACEMENT.register("fifo")
class FIFO(Replacement):
  """First in, first out: hits do not change the order."""
  name = "fifo"

  def __init__(self):
    self._order: collections.OrderedDict = collections.OrderedDict()

  def insert(self, key: Hashable) -> None:
    self._order.setdefault(key, None)

  def touch(self, key: Hashable) -> None:
    del key

  def remove(self, key: Hashable) -> None:
    self._order.pop(key, None)

  def victim(self) -> Hashable:
    return next(iter(self._order))
