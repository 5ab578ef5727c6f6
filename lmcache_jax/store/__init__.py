"""Chunked prefix store of KV caches: device, pinned host and disk tiers."""

from lmcache_jax.store.config import from_config
from lmcache_jax.store.keys import model_fingerprint
from lmcache_jax.store.layout import Layout
from lmcache_jax.store.store import KVStore, Prefix

__all__ = ["from_config", "model_fingerprint", "Layout", "KVStore", "Prefix"]
