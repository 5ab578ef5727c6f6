"""Slot-range helpers that work on dense and quantized payloads alike.

Eviction and the tiered store move tokens by slot. Every leaf of a payload
has the slot axis at index 3 ([L, B, K|R, S, ...]); leaves with one entry
per row (``heads``, ``channel_scale``, ``channel_shift``) are kept whole, and the exact copies
(indexed by entry) are kept with their slot map shifted into the range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.cache.kv_cache import tree_nbytes
from lmcache_jax.quant import payload as qpayload


def capacity(kv) -> int:
  """Slots of a dense [L, B, K, S, Hd] array or a quantized payload."""
  if isinstance(kv, qpayload.QuantizedKV):
    return kv.parts[0].data.shape[3]
  return kv.shape[3]


def slice_slots(kv, start: int, stop: int):
  """The payload restricted to slots [start, stop) (same type, S' = stop - start)."""
  if not 0 <= start <= stop <= capacity(kv):
    raise ValueError(f"slot range [{start}, {stop}) is outside the cache's "
                     f"{capacity(kv)} slots")
  if not isinstance(kv, qpayload.QuantizedKV):
    return kv[:, :, :, start:stop]
  parts = tuple(p.replace(**{name: getattr(p, name)[:, :, :, start:stop]
                             for name in p.slot_leaves}) for p in kv.parts)
  inside = (kv.exact_slots >= start) & (kv.exact_slots < stop)
  return kv.replace(parts=parts,
                    exact_slots=jnp.where(inside, kv.exact_slots - start, -1))


def dequantize_slots(kv, start: int, stop: int, dtype=jnp.float32) -> jax.Array:
  """Dense [L, B, K, stop - start, Hd] of slots [start, stop), exact copies
  overlaid (a dense payload is just sliced)."""
  part = slice_slots(kv, start, stop)
  if not isinstance(part, qpayload.QuantizedKV):
    return part.astype(dtype)
  return jax.vmap(lambda layer: qpayload.dequantize(layer, dtype))(part)


def payload_nbytes(kv) -> int:
  """Bytes of a payload's leaves (codes, scales, zeros, exact copies, maps)."""
  return tree_nbytes(kv)
