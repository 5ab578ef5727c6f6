"""The storage tiers, fastest first: device memory, pinned host memory, disk."""

from lmcache_jax.store.tiers.device import DeviceTier
from lmcache_jax.store.tiers.disk import DiskTier
from lmcache_jax.store.tiers.host import HostTier

__all__ = ["DeviceTier", "HostTier", "DiskTier"]
