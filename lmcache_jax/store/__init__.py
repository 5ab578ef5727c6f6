"""Chunked prefix store of KV caches over an ordered list of storage tiers."""

from lmcache_jax.store.crypto import Cipher, load_cipher
from lmcache_jax.store.keys import model_fingerprint
from lmcache_jax.store.layout import Layout
from lmcache_jax.store.store import KVStore, Prefix
from lmcache_jax.store.tier import MemoryTier, Replacement, Tier
from lmcache_jax.store.tiers import DeviceTier, DiskTier, HostTier

__all__ = ["Cipher", "load_cipher", "model_fingerprint", "Layout", "KVStore",
           "Prefix", "Replacement", "Tier", "MemoryTier", "DeviceTier",
           "HostTier", "DiskTier"]
