"""``attention_sink``: StreamingLLM — the first tokens plus a recent window.

Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks":
keep 4 initial "sink" tokens and the most recent ``budget - 4``; positions are
re-assigned inside the cache (the model sees the kept tokens as contiguous),
which keeps perplexity flat far past the pretraining length. Here kept keys are
re-rotated (see ``lmcache_jax.cache.positions``), so the policy needs the
model's RoPE: ``bind(cfg)``, done by the engine and ``experiments.run``.
A streaming method, it holds the budget while decoding (``evict_every=1``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


@EVICTION.register("attention_sink")
@dataclasses.dataclass(frozen=True)
class AttentionSink(EvictionPolicy):
  """StreamingLLM: ``sinks`` first tokens + the most recent, positions re-assigned."""
  name = "attention_sink"
  uses_attention_mass = False
  only_sinks_move = True   # the oldest non-sink goes first: nothing older moves
  sinks: int = 4
  reposition: bool = True
  evict_every: int = 1

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del mass, step
    return cache.positions.astype(jnp.float32)
