"""``h2o``: Heavy-Hitter Oracle — accumulated attention plus a recent window.

Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models": each token's score is the attention it has
received from every query so far (summed); the cache keeps the heavy hitters
and the most recent tokens, half of the budget each (the paper's scripts use
10% + 10% of the sequence), chosen per head. H2O is a generation-time method:
it holds the budget at every decoding step (``evict_every=1``).
"""

from __future__ import annotations

import dataclasses

import jax

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


@EVICTION.register("h2o")
@dataclasses.dataclass(frozen=True)
class H2O(EvictionPolicy):
  """Heavy hitters by accumulated attention + a recent window (default budget/2)."""
  name = "h2o"
  window: int | None = None   # None: half the budget
  evict_every: int = 1

  def __post_init__(self):
    if self.window is None and isinstance(self.budget, int):
      object.__setattr__(self, "window", self.budget // 2)
    super().__post_init__()

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del step
    return cache.scores + mass
