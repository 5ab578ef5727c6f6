"""Attention over the slots of one written cache layer, in any format.

The general path, and the reference every fast path is tested against: the
step's keys and values are already in their slots, and every query attends
to all occupied slots whose original position is not after its own. It also
reports the mass each slot received (summed over the group's query heads and
the weighted queries), which eviction scorers consume.

Dense payloads attend blocked (long steps over large caches) or densely.
Packed payloads (``quant.payload.QuantizedKV``) are read by the fused Pallas
kernel in decode, and dequantized otherwise (also in decode when the plan
keeps outlier entries: the kernel reads codes only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.attention.blocked import (block_size_for, blocked_attend,
                                           blocked_mass)
from lmcache_jax.attention.layer import LayerKV, is_quantized, matmul_precision
from lmcache_jax.attention.packed import attend_packed_decode
from lmcache_jax.kernels import backend
from lmcache_jax.kernels.masking import MASKED, visible
from lmcache_jax.quant import payload as qpayload

# Steps with fewer queries (decode) attend densely: their logits are small.
_MIN_BLOCKED_QUERIES = 16


def attend_slots(q: jax.Array, layer: LayerKV, query_positions: jax.Array,
                 query_weights: jax.Array, with_mass: bool = True
                 ) -> tuple[jax.Array, jax.Array | None]:
  """Causal attention of q [B, T, N, Hd] over the cache's slots.

  Args:
    q: rotated queries, N = K * G query heads grouped by kv head.
    layer: the cache after this step's keys were written.
    query_positions: [B, T] original positions; -1 marks padding.
    query_weights: [B, T] weight of each query in the returned slot mass.
    with_mass: compute the slot mass (policies that score by attention need
      it; skipping it saves a second pass over the keys).

  Returns:
    out [B, T, N, Hd] in q's dtype (zeros for padding queries), and
    mass [B, K, S] float32: attention each slot received, summed over the
    group's heads and weighted queries (None without ``with_mass``).
  """
  if not is_quantized(layer):
    out, mass = _attend_any(q, layer.keys, layer.values, layer.positions,
                            query_positions, query_weights, with_mass)
  elif q.shape[1] == 1 and not (qpayload.has_outliers(layer.keys)
                                or qpayload.has_outliers(layer.values)):
    out, mass = attend_packed_decode(q, layer, query_positions, query_weights,
                                     with_mass)
  else:
    if q.shape[1] == 1:
      backend.note("decode_attention", "plans with outliers decode from the "
                   "dequantized layer: the fused kernel reads codes only")
    keys = qpayload.dequantize(layer.keys, q.dtype)
    values = qpayload.dequantize(layer.values, q.dtype)
    out, mass = _attend_any(q, keys, values, layer.positions, query_positions,
                            query_weights, with_mass)
  return out, (mass if with_mass else None)


def _attend_any(q, keys, values, positions, query_positions, query_weights,
                with_mass):
  """Blocked attention for multi-token steps over large caches (bounded
  memory, causal block skipping); dense otherwise (decode, small caches)."""
  block = block_size_for(keys.shape[2])
  if q.shape[1] < _MIN_BLOCKED_QUERIES or block is None:
    return dense_attend(q, keys, values, positions, query_positions,
                        query_weights)
  precision = matmul_precision(q.dtype)
  out, lse = blocked_attend(q, keys, values, positions, query_positions,
                            block=block, precision=precision)
  mass = (blocked_mass(q, lse, keys, positions, query_positions,
                       query_weights, block=block, precision=precision)
          if with_mass else None)
  return out, mass


def dense_attend(q, keys, values, positions, query_positions, query_weights):
  """Attention with every logit materialized: out [B, T, N, Hd] in q's dtype
  and mass [B, K, S] float32 (the weighted queries' attention per slot)."""
  batch, steps, num_heads, head_dim = q.shape
  num_kv = keys.shape[1]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  precision = matmul_precision(q.dtype)
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys,
                      precision=precision,
                      preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  seen = visible(positions[:, :, None, None, :],
                 query_positions[:, None, None, :, None])
  logits = jnp.where(seen, logits, MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(seen, probs, 0.0)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", probs.astype(values.dtype),
                   values, precision=precision,
                   preferred_element_type=jnp.float32)
  mass = jnp.einsum("BKGTS,BT->BKS", probs, query_weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  return out.reshape(q.shape).astype(q.dtype), mass
