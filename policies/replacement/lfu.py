"""``lfu``: evict the chunk with the fewest hits; ties go to the oldest arrival.

Keeps a shared document's chunks resident while one-off prompts churn through.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable

from lmcache_jax.store.tier import Replacement
from policies.registry import REPLACEMENT


@REPLACEMENT.register("lfu")
class LFU(Replacement):
  """Least frequently used, with lazy deletion from a min-heap of (hits, arrival)."""
  name = "lfu"

  def __init__(self):
    self._hits: dict[Hashable, tuple[int, int]] = {}
    self._heap: list[tuple[int, int, Hashable]] = []
    self._clock = itertools.count()

  def _push(self, key: Hashable, hits: int, arrival: int) -> None:
    self._hits[key] = (hits, arrival)
    heapq.heappush(self._heap, (hits, arrival, key))

  def insert(self, key: Hashable) -> None:
    if key not in self._hits:
      self._push(key, 0, next(self._clock))

  def touch(self, key: Hashable) -> None:
    if key in self._hits:
      hits, arrival = self._hits[key]
      self._push(key, hits + 1, arrival)
      if len(self._heap) > 2 * len(self._hits) + 64:
        self._heap = [(h, a, k) for k, (h, a) in self._hits.items()]
        heapq.heapify(self._heap)

  def remove(self, key: Hashable) -> None:
    self._hits.pop(key, None)

  def victim(self) -> Hashable:
    while True:
      hits, arrival, key = self._heap[0]
      if self._hits.get(key) == (hits, arrival):
        return key
      heapq.heappop(self._heap)
