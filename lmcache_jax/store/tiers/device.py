"""The device tier: chunks kept as arrays in the accelerator's memory (HBM).

A hit moves nothing, and the store never seals these chunks: they do not
leave the device.
"""

from __future__ import annotations

import jax

from lmcache_jax.store.memory import device_sharding
from lmcache_jax.store.tier import MemoryTier


class DeviceTier(MemoryTier):
  """Chunks as device arrays, up to ``capacity`` bytes."""
  name = "device"

  def sharding(self, device: jax.Device) -> jax.sharding.Sharding:
    return device_sharding(device)
