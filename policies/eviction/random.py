"""``random``: evict uniformly at random — the control every ablation needs.

kvpress's ``RandomPress`` plays the same role. A slot's score is a hash of
(seed, layer, head, token position), so runs are reproducible, heads choose
independently, and a token keeps one score for its whole life. As kvpress's
presses, it compresses the prompt once and decoding keeps every new token
(``evict_every=0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


def uniform_hash(seed: int, *fields: jax.Array) -> jax.Array:
  """Float32 in [0, 1) from integer fields (murmur3's finaliser per field)."""
  x = jnp.uint32(seed & 0xFFFFFFFF) * jnp.uint32(0x9E3779B9)
  for field in fields:
    x = x ^ field.astype(jnp.uint32)
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
  return (x >> 8).astype(jnp.float32) / float(1 << 24)


@EVICTION.register("random")
@dataclasses.dataclass(frozen=True)
class Random(EvictionPolicy):
  """Evicts random tokens (reproducible from ``seed``)."""
  name = "random"
  uses_attention_mass = False
  seed: int = 0
  evict_every: int = 0

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del mass, step
    shape = cache.positions.shape
    layer = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    head = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    return uniform_hash(self.seed, layer, head, cache.positions)
