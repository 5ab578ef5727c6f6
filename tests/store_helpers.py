"""Shared helpers of the store tests: synthetic caches and small stores."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.numerics.formats import get_format
from lmcache_jax.quant.payload import Packed, QuantizedKV
from lmcache_jax.store import DeviceTier, DiskTier, HostTier, KVStore, Layout
from policies.registry import REPLACEMENT
from conftest import tiny_config

CHUNK = 8


def filled_cache(seed: int, batch: int = 1, capacity: int = 64,
                 length: int | None = None, cfg=None):
  """A cache whose payload is random (a distinct value per slot) and full to ``length``."""
  cfg = cfg or tiny_config()
  cache = init_cache(cfg, batch, capacity, jnp.float32)
  rng = np.random.default_rng(seed)
  length = capacity if length is None else length
  slots = np.arange(capacity)
  positions = np.where(slots < length, slots, -1)
  return cache.replace(
      keys=jnp.asarray(rng.standard_normal(cache.keys.shape), jnp.float32),
      values=jnp.asarray(rng.standard_normal(cache.values.shape), jnp.float32),
      positions=jnp.broadcast_to(jnp.asarray(positions, jnp.int32),
                                 cache.positions.shape),
      lengths=jnp.full((batch,), length, jnp.int32))


def make_tiers(device_bytes=None, host_bytes=None, disk_dir=None,
               disk_bytes=None, replacement: str = "lru") -> list:
  """The tiers given a capacity (the disk tier also by a directory), fastest
  first, each with its own ``replacement`` rule."""
  tiers = []
  if device_bytes is not None:
    tiers.append(DeviceTier(device_bytes, REPLACEMENT.make(replacement)))
  if host_bytes is not None:
    tiers.append(HostTier(host_bytes, REPLACEMENT.make(replacement)))
  if disk_dir is not None or disk_bytes is not None:
    tiers.append(DiskTier(disk_dir, disk_bytes, REPLACEMENT.make(replacement)))
  return tiers


def make_store(fingerprint: bytes = b"test-model", chunk_size: int = CHUNK,
               tiers=None, cipher=None, **capacities) -> KVStore:
  """A store of the tiny model's float32 caches over ``tiers``, or over the
  tiers ``make_tiers(**capacities)`` builds."""
  layout = Layout.of(init_cache(tiny_config(), 1, 16, jnp.float32))
  tiers = make_tiers(**capacities) if tiers is None else tiers
  return KVStore(layout, tiers, model_fingerprint=fingerprint,
                 chunk_size=chunk_size, cipher=cipher)


def tokens_for(seed: int, n: int) -> list[int]:
  return [int(t) for t in np.random.default_rng(seed).integers(2, 97, n)]


def assert_prefix_is(prefix, cache, row: int = 0) -> None:
  """Every loaded chunk equals the cache's slots for its tokens."""
  c = CHUNK
  for i, chunk in enumerate(prefix.chunks):
    np.testing.assert_array_equal(chunk[0], cache.keys[:, row, :, i * c:(i + 1) * c])
    np.testing.assert_array_equal(chunk[1], cache.values[:, row, :, i * c:(i + 1) * c])


def quantized_like_cache(capacity=32, group=4):
  """A quantized payload whose scales and zeros are shared by ``group`` slots."""
  base = init_cache(tiny_config(), 1, capacity, jnp.float32)
  rng = np.random.default_rng(3)
  lead = base.keys.shape[:3]                              # [L, B, K]
  pool = (lead[1], lead[0] * lead[2])                     # [B, P = L·K]

  def payload():
    part = Packed(
        data=jnp.asarray(rng.integers(0, 2**32, pool + (capacity, 2)), jnp.uint32),
        scale=jnp.asarray(rng.standard_normal(pool + (capacity // group, 1)),
                          jnp.float16),
        zero=jnp.asarray(rng.integers(0, 256, pool + (capacity // group, 1)),
                         jnp.uint8),
        heads=jnp.broadcast_to(jnp.arange(lead[2])[None, None, :, None],
                               lead + (1,)),
        first=jnp.arange(lead[0], dtype=jnp.int32) * lead[2],
        fmt=get_format("int4"), group_size=8)
    return QuantizedKV(parts=(part,), exact=jnp.zeros(lead + (0, 8)),
                       exact_slots=jnp.zeros(lead + (0,), jnp.int32),
                       channel_scale=None, sinks=0, residual=0)
  return KVCache(payload(), payload(), base.positions, base.scores,
                 jnp.array([capacity], jnp.int32))
