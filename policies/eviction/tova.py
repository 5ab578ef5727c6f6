"""``tova``: Token Omission Via Attention.

Oren et al., 2024, "Transformers are Multi-State RNNs": at every step, drop the
token that receives the lowest attention from the *current* query, averaged
over all heads of the layer (so a layer drops the same token in every head).
No recent window and no sinks: the paper observes that the first token is kept
on its own merit. In a multi-token forward pass the last query decides. TOVA
evicts at every decoding step (``evict_every=1``), as in the paper; like any
policy here it never evicts the token just written (kvpress's TOVAPress also
keeps the last token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


@EVICTION.register("tova")
@dataclasses.dataclass(frozen=True)
class TOVA(EvictionPolicy):
  """Evicts the token with the least attention from the current query (head mean)."""
  name = "tova"
  observe = "last"
  evict_every: int = 1

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del step
    return jnp.broadcast_to(jnp.mean(mass, axis=2, keepdims=True),
                            cache.scores.shape)
