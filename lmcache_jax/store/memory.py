"""Where the memory tiers put arrays: HBM, and pinned host memory.

``pinned_host`` memory is page-locked, so the device copies it by DMA at the
link's full rate. A backend without that memory kind gets the nearest it has
(said once in the log).
"""

from __future__ import annotations

import functools

import jax

from lmcache_jax.store.tier import log

HOST_KINDS = ("pinned_host", "unpinned_host")


@functools.cache
def host_sharding(device: jax.Device) -> jax.sharding.Sharding:
  kinds = [m.kind for m in device.addressable_memories()]
  for kind in HOST_KINDS:
    if kind in kinds:
      if kind != HOST_KINDS[0]:
        log.info("host tier: %s has no pinned_host memory; using %s",
                 device, kind)
      return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
  log.info("host tier: %s has no host memory kind (has %s); host chunks stay "
           "in its default memory", device, kinds)
  return jax.sharding.SingleDeviceSharding(device)


@functools.cache
def device_sharding(device: jax.Device) -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(
      device, memory_kind=device.default_memory().kind)
