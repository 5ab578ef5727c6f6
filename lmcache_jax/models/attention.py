"""Grouped-query attention over the slots of a KV cache, one layer.

New keys and values are first written into their slots, then every query
attends to all occupied slots whose original position is not after its own.
Attention also reports the mass each slot received (summed over the group's
query heads and the weighted queries), which eviction scorers consume.

Keys and values are either dense arrays or quantized payloads
(``lmcache_jax.quant.payload.QuantizedKV``). Quantized ones are quantized on
write; a single-token (decode) step reads them with the fused Pallas kernel,
longer steps (prefill) dequantize the layer and attend densely, as does
decode when the plan keeps outlier entries (the kernel reads codes only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmcache_jax.kernels import backend
from lmcache_jax.kernels.decode_attention import (decode_attention,
                                                  dense_decode_attention)
from lmcache_jax.models.blocked_attention import block_size_for, blocked_attend
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.quant import transform

_MASKED = -1e30
# Steps with fewer queries (decode) attend densely: their logits are small.
_MIN_BLOCKED_QUERIES = 16


class LayerKV(NamedTuple):
  """One layer's slice of the cache: keys/values [B, K, S, Hd] (or quantized
  payloads), positions [B, K, S]."""
  keys: jax.Array | qpayload.QuantizedKV
  values: jax.Array | qpayload.QuantizedKV
  positions: jax.Array
  scores: jax.Array


def matmul_precision(dtype) -> jax.lax.Precision:
  """Full float32 products when computing in float32 (no TF32 on GPUs)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def is_quantized(layer: LayerKV) -> bool:
  return isinstance(layer.keys, qpayload.QuantizedKV)


def write_slots(layer: LayerKV, k: jax.Array, v: jax.Array,
                token_positions: jax.Array, slots: jax.Array) -> LayerKV:
  """Stores k, v [B, T, K, Hd] of tokens at ``token_positions`` [B, T] in ``slots`` [B, K, T].

  Out-of-range slots (padding) are dropped. A written slot's score restarts at 0.
  """
  batch, _, num_kv, _ = k.shape
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_kv)[None, :, None]
  pos = jnp.broadcast_to(token_positions[:, None, :], slots.shape)
  if is_quantized(layer):
    keys = qpayload.write(layer.keys, jnp.swapaxes(k, 1, 2), token_positions,
                          slots)
    values = qpayload.write(layer.values, jnp.swapaxes(v, 1, 2),
                            token_positions, slots)
  else:
    keys = layer.keys.at[b, h, slots].set(
        jnp.swapaxes(k, 1, 2).astype(layer.keys.dtype), mode="drop")
    values = layer.values.at[b, h, slots].set(
        jnp.swapaxes(v, 1, 2).astype(layer.values.dtype), mode="drop")
  return LayerKV(
      keys=keys,
      values=values,
      positions=layer.positions.at[b, h, slots].set(pos, mode="drop"),
      scores=layer.scores.at[b, h, slots].set(0.0, mode="drop"),
  )


def attend(q: jax.Array, layer: LayerKV, query_positions: jax.Array,
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
    out, mass = _attend_packed_decode(q, layer, query_positions, query_weights,
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
  if q.shape[1] >= _MIN_BLOCKED_QUERIES and block is not None:
    return blocked_attend(q, keys, values, positions, query_positions,
                          query_weights, block=block, with_mass=with_mass,
                          precision=matmul_precision(q.dtype))
  return _attend_dense(q, keys, values, positions, query_positions,
                       query_weights)


def _attend_dense(q, keys, values, positions, query_positions, query_weights):
  batch, steps, num_heads, head_dim = q.shape
  num_kv = keys.shape[1]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  precision = matmul_precision(q.dtype)
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys,
                      precision=precision,
                      preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  slot_pos = positions[:, :, None, None, :]                # [B, K, 1, 1, S]
  q_pos = query_positions[:, None, None, :, None]          # [B, 1, 1, T, 1]
  visible = (slot_pos >= 0) & (slot_pos <= q_pos) & (q_pos >= 0)
  logits = jnp.where(visible, logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(visible, probs, 0.0)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", probs.astype(values.dtype),
                   values, precision=precision,
                   preferred_element_type=jnp.float32)
  mass = jnp.einsum("BKGTS,BT->BKS", probs, query_weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  return out.reshape(q.shape).astype(q.dtype), mass


def _attend_packed_decode(q, layer: LayerKV, query_positions, query_weights,
                          with_mass: bool):
  """One query per sequence: fused kernel per format part, plus the exact
  copies (sinks, recent window) attended densely, merged by log-sum-exp."""
  batch, _, num_heads, head_dim = q.shape
  keys, values = layer.keys, layer.values
  num_kv = keys.num_kv_heads
  capacity = layer.positions.shape[-1]
  qg = q[:, 0].reshape(batch, num_kv, num_heads // num_kv, head_dim)
  q_pos = query_positions[:, 0]
  # Slots with an exact copy are read from the copy, not the packed codes.
  packed_pos = layer.positions
  if keys.exact.shape[-2]:
    packed_pos = jnp.where(qpayload.mirrored(keys, capacity), -1, packed_pos)
  # The kernel reads keys as stored (centered, scaled, rotated): q·k =
  # (q ⊙ scale)H · stored + q·shift, the last term the same for every slot.
  q_stored = qg
  if keys.channel_scale is not None:
    q_stored = q_stored * keys.channel_scale
  if keys.rotate:
    q_stored = transform.rotate(q_stored)
  q_stored = q_stored.astype(q.dtype)   # bf16 tensor-core dots on the GPU
  out, lse, logits = _attend_parts(q_stored, q_pos, packed_pos, keys, values,
                                   with_mass)
  if values.rotate:
    out = transform.unrotate(out)
  if keys.channel_shift is not None:
    bias = jnp.einsum("BKGH,BKH->BKG", qg.astype(jnp.float32),
                      keys.channel_shift[:, :, 0],
                      precision=jax.lax.Precision.HIGHEST) * head_dim ** -0.5
    lse = lse + bias
    logits = None if logits is None else logits + bias[..., None]
  if keys.exact.shape[-2]:
    out_e, lse_e, logits_e = _attend_exact(qg, layer, q_pos)
    both = jnp.logaddexp(lse, lse_e)
    out = (out * jnp.exp(lse - both)[..., None]
           + out_e * jnp.exp(lse_e - both)[..., None])
    lse = both
  mass = None
  if with_mass:
    weight = query_weights[:, 0].astype(jnp.float32)[:, None, None]
    mass = jnp.sum(jnp.exp(logits - lse[..., None]), axis=2) * weight
    if keys.exact.shape[-2]:
      mass_e = jnp.sum(jnp.exp(logits_e - lse[..., None]), axis=2)  # [B, K, E]
      target = jnp.where(keys.exact_slots >= 0, keys.exact_slots, capacity)
      mass = mass.at[jnp.arange(batch)[:, None, None],
                     jnp.arange(num_kv)[None, :, None],
                     target].add(mass_e * weight, mode="drop")
  out = out * (q_pos >= 0)[:, None, None, None]
  return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype), mass


def _attend_parts(q_stored, q_pos, packed_pos, keys, values, with_logits):
  """The fused kernel over each format part of the packed payloads: out,
  lse [B, K, G] and (with_logits) logits [B, K, G, S] over packed slots."""
  num_kv = keys.num_kv_heads
  capacity = packed_pos.shape[-1]
  b = jnp.arange(q_stored.shape[0])[:, None]
  out = jnp.zeros(q_stored.shape, jnp.float32)
  lse = jnp.full(q_stored.shape[:-1], _MASKED, jnp.float32)
  logits = (jnp.full((*q_stored.shape[:-1], capacity), _MASKED, jnp.float32)
            if with_logits else None)
  for kp, vp in zip(keys.parts, values.parts):
    identity = qpayload.identity_rows(keys, kp)
    rows = qpayload._rows(kp.heads, num_kv)                # [B, R]
    safe = jnp.minimum(rows, num_kv - 1)
    take = ((lambda a: a) if identity else
            (lambda a: jnp.take_along_axis(
                a, safe.reshape(*safe.shape, *([1] * (a.ndim - 2))), axis=1)))
    o, l, s = decode_attention(
        take(q_stored), q_pos, take(packed_pos), kp.data, kp.scale, kp.zero,
        vp.data, vp.scale, vp.zero, fmt=kp.fmt, group_size=kp.group_size,
        with_logits=with_logits)
    s = s.dense() if with_logits else None
    if identity:
      out, lse, logits = o, l, s
      continue
    out = out.at[b, rows].set(o, mode="drop")
    lse = lse.at[b, rows].set(l, mode="drop")
    if with_logits:
      logits = logits.at[b, rows].set(s, mode="drop")
  return out, lse, logits


def _attend_exact(qg, layer: LayerKV, q_pos):
  """Dense attention over the exact copies: out, lse, logits [B, K, G, E]."""
  keys = layer.keys
  slot = jnp.maximum(keys.exact_slots, 0)
  pos_e = jnp.take_along_axis(layer.positions, slot, axis=-1)   # [B, K, E]
  visible = ((keys.exact_slots >= 0) & (pos_e >= 0)
             & (pos_e <= q_pos[:, None, None]))
  return dense_decode_attention(qg, qpayload.copies(keys),
                                qpayload.copies(layer.values), visible)
