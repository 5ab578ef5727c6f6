"""``sliding_window``: the most recent ``budget`` tokens, nothing else.

The baseline StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language
Models with Attention Sinks") shows collapsing once the first tokens leave the
window: without its attention sinks the softmax has nowhere to put surplus mass.
It holds the budget while decoding (``evict_every=1``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


@EVICTION.register("sliding_window")
@dataclasses.dataclass(frozen=True)
class SlidingWindow(EvictionPolicy):
  """Keeps the newest ``budget`` tokens (a pure recency window)."""
  name = "sliding_window"
  uses_attention_mass = False
  evict_every: int = 1

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del mass, step
    return cache.positions.astype(jnp.float32)
