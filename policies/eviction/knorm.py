"""``knorm``: keep the keys of lowest L2 norm.

Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
Cache Compression": a low key norm correlates with high attention, so the
tokens with the largest key norms are evicted, per head, with no attention
statistics at all. RoPE preserves norms, so post-RoPE keys give the same score.
As kvpress's KnormPress, it compresses the prompt once and decoding keeps
every new token (``evict_every=0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from lmcache_jax.quant import payload
from policies.registry import EVICTION


@EVICTION.register("knorm")
@dataclasses.dataclass(frozen=True)
class KNorm(EvictionPolicy):
  """Keeps the keys with the lowest L2 norm (no attention needed)."""
  name = "knorm"
  uses_attention_mass = False
  evict_every: int = 0

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del mass, step
    keys = cache.keys
    if not isinstance(keys, jax.Array):   # quantized payload: score what is read
      keys = payload.dequantize_layers(keys, jnp.float32)
    keys = keys.astype(jnp.float32)
    return -jnp.sqrt(jnp.sum(keys * keys, axis=-1))
