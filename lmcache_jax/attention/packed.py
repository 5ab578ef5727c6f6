"""Decode attention over a packed (quantized) cache layer.

One query per sequence. The fused Pallas kernel reads each format part of
the packed payload (``kernels.decode_attention``) in the coordinates the
codes are stored in; the exact copies (sinks, recent window) are attended
densely; the parts are merged exactly by log-sum-exp.

Keys on per-channel grids (KIVI, ``QuantPlan.key_layout="channel"``) have
no fused kernel (it reads one grid per slot): such a layer is dequantized,
its copies overlaid, and attended densely (named once in the log).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.attention.layer import LayerKV
from lmcache_jax.kernels import backend
from lmcache_jax.kernels.decode_attention import (decode_attention,
                                                  dense_decode_attention)
from lmcache_jax.kernels.masking import MASKED, visible
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.quant import transform


def attend_packed_decode(q, layer: LayerKV, query_positions, query_weights,
                          with_mass: bool, layer_index=None):
  """One query per sequence: fused kernel per format part, plus the exact
  copies (sinks, recent window) attended densely, merged by log-sum-exp.

  ``layer_index``: ``layer`` is the whole stacked cache and this layer is
  read; the kernel reads its per-token codes where they lie in their pools.
  """
  if layer_index is not None:
    stacked, at = layer, layer_index
    view = lambda p: qpayload.layer_view(p, at, codes_in_place=True)  # noqa: E731
    layer = LayerKV(view(stacked.keys), view(stacked.values),
                    jax.lax.dynamic_index_in_dim(stacked.positions, at,
                                                 keepdims=False), None)
  batch, _, num_heads, head_dim = q.shape
  keys, values = layer.keys, layer.values
  num_kv = keys.num_kv_heads
  capacity = layer.positions.shape[-1]
  qg = q[:, 0].reshape(batch, num_kv, num_heads // num_kv, head_dim)
  q_pos = query_positions[:, 0]
  if qpayload.per_channel(keys):
    if layer_index is not None:
      layer = layer._replace(
          keys=qpayload.layer_view(stacked.keys, layer_index),
          values=qpayload.layer_view(stacked.values, layer_index))
    return _attend_dequantized(qg, layer, q_pos, query_weights, with_mass,
                               q.dtype)
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
                                   with_mass, pooled=layer_index is not None)
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


def _attend_dequantized(qg, layer: LayerKV, q_pos, query_weights,
                        with_mass: bool, dtype):
  """Float32 attention of qg [B, K, G, Hd] over the dequantized layer (copies
  overlaid): out [B, 1, N, Hd] in ``dtype`` and the mass [B, K, S]."""
  backend.note("decode_attention", "keys quantized per channel (KIVI) decode "
               "from the dequantized layer: the fused kernel reads one grid "
               "per slot")
  batch, num_kv, group, head_dim = qg.shape
  keys = qpayload.dequantize(layer.keys, jnp.float32)
  values = qpayload.dequantize(layer.values, jnp.float32)
  seen = visible(layer.positions, q_pos[:, None, None])
  out, lse, logits = dense_decode_attention(qg, keys, values, seen)
  mass = None
  if with_mass:
    weight = query_weights[:, 0].astype(jnp.float32)[:, None, None]
    mass = jnp.sum(jnp.exp(logits - lse[..., None]), axis=2) * weight
  out = out * (q_pos >= 0)[:, None, None, None]
  return out.reshape(batch, 1, num_kv * group, head_dim).astype(dtype), mass


def _attend_parts(q_stored, q_pos, packed_pos, keys, values, with_logits,
                  pooled: bool = False):
  """The fused kernel over each format part of the packed payloads: out,
  lse [B, K, G] and (with_logits) logits [B, K, G, S] over packed slots
  (``pooled``: each part's codes are its whole row pool, read from the
  view's ``first`` row)."""
  num_kv = keys.num_kv_heads
  capacity = packed_pos.shape[-1]
  b = jnp.arange(q_stored.shape[0])[:, None]
  out = jnp.zeros(q_stored.shape, jnp.float32)
  lse = jnp.full(q_stored.shape[:-1], MASKED, jnp.float32)
  logits = (jnp.full((*q_stored.shape[:-1], capacity), MASKED, jnp.float32)
            if with_logits else None)
  for kp, vp in zip(keys.parts, values.parts):
    identity = qpayload.identity_rows(keys, kp)
    rows = qpayload.part_rows(kp.heads, num_kv)                # [B, R]
    safe = jnp.minimum(rows, num_kv - 1)
    take = ((lambda a: a) if identity else
            (lambda a: jnp.take_along_axis(
                a, safe.reshape(*safe.shape, *([1] * (a.ndim - 2))), axis=1)))
    o, l, s = decode_attention(
        take(q_stored), q_pos, take(packed_pos), kp.data, kp.scale, kp.zero,
        vp.data, vp.scale, vp.zero, fmt=kp.fmt, group_size=kp.group_size,
        with_logits=with_logits, first_row=kp.first if pooled else None)
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
  seen = (keys.exact_slots >= 0) & visible(pos_e, q_pos[:, None, None])
  return dense_decode_attention(qg, qpayload.copies(keys),
                                qpayload.copies(layer.values), seen)
