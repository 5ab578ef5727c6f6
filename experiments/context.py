"""What a task receives: the resolved config, the model, and cache factories."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.models.loaded import LoadedModel


@dataclasses.dataclass
class RunContext:
  """Everything one run shares between its tasks.

  ``quant`` is a quantization plan (or None for a full-precision cache) and
  ``store`` a prefix store (or None); both come from the config.
  """
  config: ml_collections.ConfigDict
  lm: LoadedModel
  policy: CachePolicy
  quant: Any = None
  store: Any = None

  def new_cache(self, batch_size: int, capacity: int) -> KVCache:
    """An empty cache in this run's dtype and quantization."""
    if self.quant is None:
      return init_cache(self.lm.cfg, batch_size, capacity, self.lm.dtype)
    return init_cache(self.lm.cfg, batch_size, capacity, self.lm.dtype,
                      quant=self.quant)

  def capacity_for(self, context: int, chunk: int) -> int:
    return self.policy.cache_capacity(context, chunk)
