"""Decode attention read in place from the layer-stacked bf16 cache.

One query per sequence attends over one layer of keys and values stored
[L, B, K, S, Hd]: the kernel takes the whole stacked array and the layer
index, so no layer is ever copied out of the cache. Programs split the slots
(split-K); their partial softmax states are merged after by log-sum-exp.

Contract: q [B, K, G, Hd] (query heads grouped by kv head) in the cache's
16-bit dtype; a slot is visible when its position is in [0, q_pos]; out
[B, K, G, Hd] float32 and lse [B, K, G] float32 (MASKED where nothing is
visible). Products run on tensor cores with float32 accumulation; the
reference computes the same function in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose, next_pow2
from lmcache_jax.kernels.masking import MASKED, visible

# Triton runs products on tiles of at least 16 rows.
_MIN_ROWS = 16


def _kernel(layer_ref, limit_ref, qpos_ref, q_ref, pos_ref, k_ref, v_ref,
            acc_ref, m_ref, l_ref, *, block_s: int, split_s: int,
            scale: float):
  layer = layer_ref[0]
  limit = limit_ref[0]                        # slots of this row to visit
  q_pos = qpos_ref[0]
  q = q_ref[...]                              # [rows, Hd]
  start = pl.program_id(2) * split_s
  steps = jnp.clip(pl.cdiv(limit - start, block_s), 0, split_s // block_s)

  def body(i, carry):
    acc, m, l = carry
    slots = pl.ds(start + i * block_s, block_s)
    k = k_ref[layer, slots, :]                # [block_s, Hd]
    v = v_ref[layer, slots, :]
    seen = visible(pos_ref[layer, slots], q_pos)[None, :]
    logits = plgpu.dot(q, k, trans_b=True) * scale
    logits = jnp.where(seen, logits, MASKED)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    p = jnp.where(seen, jnp.exp(logits - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l

  rows, head_dim = q.shape
  acc, m, l = jax.lax.fori_loop(
      0, steps, body,
      (jnp.zeros((rows, head_dim), jnp.float32),
       jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32)))
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def merge_partials(acc, m, l, axis: int):
  """Combines partial softmax states along ``axis`` (acc [..., Hd] sums of
  p·v, m running maxima, l sums of p) → (out, lse); lse is MASKED and out 0
  where nothing was visible."""
  top = jnp.max(m, axis=axis, keepdims=True)
  w = jnp.exp(m - top)
  total = jnp.sum(w * l, axis=axis)
  acc = jnp.sum(w[..., None] * acc, axis=axis)
  top = jnp.squeeze(top, axis)
  some = total > 0
  out = acc / jnp.where(some, total, 1.0)[..., None]
  lse = jnp.where(some, top + jnp.log(jnp.where(some, total, 1.0)), MASKED)
  return out, lse


def block_for(slots: int, largest: int = 128) -> int | None:
  """The largest power-of-two block of at least 16 slots (at most
  ``largest``) that divides ``slots``; None when there is none."""
  block = largest
  while block >= _MIN_ROWS:
    if slots % block == 0:
      return block
    block //= 2
  return None


def num_splits(batch: int, num_kv: int, slots: int, block_s: int,
               programs: int = 1024) -> int:
  """Splits of the slot axis so that about ``programs`` programs run."""
  most = max(1, slots // block_s)
  return max(1, min(most, -(-programs // (batch * num_kv))))


def stacked_decode_attention_reference(q, q_pos, positions, keys, values,
                                       layer, limit=None, **unused):
  """Float32 attention over ``keys``/``values`` [L, B, K, S, Hd][layer]."""
  del limit, unused
  take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)  # noqa: E731
  k, v, pos = take(keys), take(values), take(positions)
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("BKGH,BKSH->BKGS", q.astype(jnp.float32),
                      k.astype(jnp.float32), precision=hi) * q.shape[-1] ** -0.5
  seen = visible(pos, q_pos[:, None, None])[:, :, None]
  logits = jnp.where(seen, logits, MASKED)
  m = jnp.max(logits, axis=-1)
  p = jnp.where(seen, jnp.exp(logits - m[..., None]), 0.0)
  acc = jnp.einsum("BKGS,BKSH->BKGH", p, v.astype(jnp.float32), precision=hi)
  return merge_partials(acc[:, :, None], m[:, :, None], jnp.sum(p, -1)[:, :, None],
                        axis=2)


@functools.partial(jax.jit, static_argnames=(
    "block_s", "splits", "num_warps", "num_stages", "interpret"))
def stacked_decode_attention(q, q_pos, positions, keys, values, layer,
                             limit=None, *, block_s: int = 128,
                             splits: int | None = None, num_warps: int = 4,
                             num_stages: int = 2,
                             interpret: bool | None = None):
  """Attention of one query per sequence over layer ``layer`` of the cache.

  Args:
    q: [B, K, G, Hd] rotated queries grouped by kv head, 16-bit.
    q_pos: [B] int32 query positions.
    positions: [L, B, K, S] int32 slot positions (-1 = empty).
    keys, values: [L, B, K, S, Hd] the stacked cache, q's dtype.
    layer: int32 scalar, the layer to read.
    limit: [B, K] int32 slots to visit from slot 0 (every visible slot lies
      below it); None = all S.
    block_s: slots per loop step (a power of two dividing S).
    splits: programs per (sequence, kv head); None = ``num_splits``.
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    out [B, K, G, Hd] float32 and lse [B, K, G] float32.
  """
  batch, num_kv, group, head_dim = q.shape
  slots = keys.shape[3]
  if slots % block_s:
    raise ValueError(f"block_s={block_s} must divide the {slots} cache slots")
  backend = choose("stacked_decode_attention", interpret)
  if backend == "reference":
    return stacked_decode_attention_reference(q, q_pos, positions, keys,
                                              values, layer)
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  if limit is None:
    limit = jnp.full((batch, num_kv), slots, jnp.int32)
  splits = splits or num_splits(batch, num_kv, slots, block_s)
  split_s = -(-slots // splits // block_s) * block_s
  splits = -(-slots // split_s)
  rows = max(_MIN_ROWS, next_pow2(group))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  num_layers = keys.shape[0]
  kernel = functools.partial(_kernel, block_s=block_s, split_s=split_s,
                             scale=head_dim ** -0.5)
  part = (batch, num_kv, splits, rows)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv, splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s: (0,)),
          pl.BlockSpec((None, None, 1), lambda b, h, s: (b, h, 0)),
          pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((num_layers, None, None, slots),
                       lambda b, h, s: (0, b, h, 0)),
          pl.BlockSpec((num_layers, None, None, slots, head_dim),
                       lambda b, h, s: (0, b, h, 0, 0)),
          pl.BlockSpec((num_layers, None, None, slots, head_dim),
                       lambda b, h, s: (0, b, h, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim),
                       lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct(part, jnp.float32),
                 jax.ShapeDtypeStruct(part, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=backend == "interpret",
  )(layer, limit.astype(jnp.int32)[..., None], q_pos.astype(jnp.int32)[:, None],
    q, positions, keys, values)
  out, lse = merge_partials(acc, m, l, axis=2)
  return out[:, :, :group], lse[:, :, :group]
