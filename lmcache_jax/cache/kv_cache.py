"""The KV cache: a pytree with a fixed capacity of slots per (layer, sequence, kv head).

Shapes never change inside ``jit``: a token occupies a *slot*, an evicted token
frees its slot for the next one, so a cache smaller than the text saves real
memory. Keys are stored after RoPE, rotated at the token's position.

  keys       [L, B, K, S, Hd]  key payload (post-RoPE), compute dtype
  values     [L, B, K, S, Hd]  value payload
  positions  [L, B, K, S]      int32 original position held by the slot; -1 = empty
  scores     [L, B, K, S]      float32 per-slot state of the eviction policy
  lengths    [B]               int32 tokens consumed per sequence (= next position)
  sink_origins                 None, or what sink keys are re-rotated from
                               (``cache.positions.SinkOrigins``), added by a
                               policy that re-assigns positions

L layers, B sequences, K kv heads, S slots (the capacity), Hd head dim.
Positions are per (layer, kv head) because policies may keep different tokens
in different heads and layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.cache.positions import SinkOrigins
from lmcache_jax.quant import payload

EMPTY = -1


def tree_nbytes(tree) -> int:
  """Bytes of every array leaf of ``tree`` (works on abstract shapes too)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree))


@struct.dataclass
class KVCache:
  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  scores: jax.Array
  lengths: jax.Array
  sink_origins: SinkOrigins | None = None

  @property
  def num_layers(self) -> int:
    return self.positions.shape[0]

  @property
  def batch_size(self) -> int:
    return self.positions.shape[1]

  @property
  def num_kv_heads(self) -> int:
    return self.positions.shape[2]

  @property
  def capacity(self) -> int:
    return self.positions.shape[3]

  @property
  def nbytes(self) -> int:
    """Bytes held on the device, bookkeeping included."""
    return tree_nbytes(self)

  @property
  def payload_nbytes(self) -> int:
    """Bytes of the key and value payload alone (with any quantization scales)."""
    return tree_nbytes((self.keys, self.values))

  def live_slots(self) -> jax.Array:
    """[L, B, K] number of occupied slots."""
    return jnp.sum(self.positions >= 0, axis=-1)


def init_cache(cfg: ModelConfig, batch_size: int, capacity: int,
               dtype=jnp.bfloat16, quant=None) -> KVCache:
  """An empty cache of ``capacity`` slots per (layer, sequence, kv head).

  ``quant``: a ``lmcache_jax.quant.QuantPlan``; keys and values then become
  packed payloads (``lmcache_jax.quant.payload.QuantizedKV``: per format a
  pool of rows [B, P, S, ...], one per (layer, head) stored in it). None =
  dense ``dtype`` arrays.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if capacity <= 0:
    raise ValueError(f"cache capacity must be positive, got {capacity}")
  kv_shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, capacity,
              cfg.head_dim)
  slot_shape = kv_shape[:-1]
  if quant is None:
    keys, values = jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)
  else:
    keys = payload.empty(cfg, quant, batch_size, capacity, dtype, keys=True)
    values = payload.empty(cfg, quant, batch_size, capacity, dtype, keys=False)
  return KVCache(
      keys=keys,
      values=values,
      positions=jnp.full(slot_shape, EMPTY, jnp.int32),
      scores=jnp.zeros(slot_shape, jnp.float32),
      lengths=jnp.zeros((batch_size,), jnp.int32),
  )


def append_slots(cache: KVCache, num_new: jax.Array, num_tokens: int) -> jax.Array:
  """Slots [L, B, K, T] for tokens appended after each sequence's last one.

  Valid when no token was ever evicted (slot == position). Token ``t`` of
  sequence ``b`` is padding when ``t >= num_new[b]``; its slot is the capacity,
  which scatters drop.
  """
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  slots = cache.lengths[:, None] + t[None, :]
  slots = jnp.where(t[None, :] < num_new[:, None], slots, cache.capacity)
  shape = (cache.num_layers, cache.batch_size, cache.num_kv_heads, num_tokens)
  return jnp.broadcast_to(slots[None, :, None, :], shape)


def first_free_slots(cache: KVCache, num_new: jax.Array,
                     num_tokens: int) -> jax.Array:
  """Slots [L, B, K, T]: the ``num_new[b]`` lowest-indexed empty slots of each row.

  Rows with fewer empty slots than tokens get the capacity (dropped) for the
  excess, so a caller must free room first; ``engine`` checks this.
  """
  if num_tokens > cache.capacity:
    raise ValueError(f"cannot place {num_tokens} tokens in a cache of "
                     f"{cache.capacity} slots; feed them in smaller chunks")
  free = cache.positions < 0
  order = jnp.argsort(~free, axis=-1, stable=True)[..., :num_tokens]
  has_room = jnp.take_along_axis(free, order, axis=-1)
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  wanted = t < num_new[None, :, None, None]
  return jnp.where(has_room & wanted, order, cache.capacity).astype(jnp.int32)
