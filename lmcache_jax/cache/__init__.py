"""The KV cache pytree, its slot bookkeeping and the policy contract."""

from lmcache_jax.cache.kv_cache import EMPTY, KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy, KeepAll
from lmcache_jax.cache.step import Step

__all__ = ["EMPTY", "KVCache", "init_cache", "CachePolicy", "KeepAll", "Step"]
