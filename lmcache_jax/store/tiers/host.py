"""The host tier: chunks kept as arrays in pinned host memory.

Pinned memory is page-locked, so the device copies it by DMA at the link's
full rate (see ``memory.host_sharding`` for backends without it). With a
cipher the store keeps sealed bytes here instead of arrays.
"""

from __future__ import annotations

import jax

from lmcache_jax.store.memory import host_sharding
from lmcache_jax.store.tier import MemoryTier


class HostTier(MemoryTier):
  """Chunks as pinned host arrays (or sealed bytes), up to ``capacity`` bytes."""
  name = "host"

  def sharding(self, device: jax.Device) -> jax.sharding.Sharding:
    return host_sharding(device)
