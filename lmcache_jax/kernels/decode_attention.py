"""Fused decode attention over a packed cache (grouped-query, split-K).

One query token per sequence. For each (sequence b, cache row r) the G query
heads sharing that kv head attend over S slots. The grid splits S into
``split_s`` slots per program (flash-decoding); a program loops over blocks of
``block_s`` slots with an online softmax, unpacking keys and values straight
from the packed words. Scales and zeros are folded out of the products
(q·k = scale·(q·code) + zero·Σq), so the inner products run on integer codes
cast to the query dtype, on tensor cores once the query heads are padded to
16 rows. Each program writes its softmax state (max m, sum l, unnormalised
output acc) and its slots' logits; a small jnp epilogue merges the programs. The logits let
the caller merge other sources (the exact residual window) and derive the
per-slot attention mass eviction scorers need, without a second read of the
cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose, floor_pow2, next_pow2
from lmcache_jax.kernels.dequantize import ChunkReader
from lmcache_jax.quant import schemes
from lmcache_jax.quant.formats import Format

MASKED = -1e30


def _qk(q, codes, dtype):
  """[G, w] x [bs, w] codes → [G, bs] float32, on tensor cores when wide enough."""
  if q.shape[1] >= 16 and q.shape[0] >= 16:
    return jax.lax.dot_general(
        q, codes.astype(dtype), (((1,), (1,)), ((), ())),
        precision=_precision(dtype), preferred_element_type=jnp.float32)
  return jnp.sum(q.astype(jnp.float32)[:, None, :]
                 * codes.astype(jnp.float32)[None, :, :], axis=2)


def _pv(p, codes, dtype):
  """[G, bs] x [bs, w] codes → [G, w] float32."""
  if codes.shape[1] >= 16 and p.shape[0] >= 16:
    return jax.lax.dot_general(
        p.astype(dtype), codes.astype(dtype), (((1,), (0,)), ((), ())),
        precision=_precision(dtype), preferred_element_type=jnp.float32)
  return jnp.sum(p[:, :, None] * codes.astype(jnp.float32)[None, :, :], axis=1)


def _tile(words_ref, rows, fmt: Format, head_dim: int):
  """int32 codes [bs, Hd] of a one-plane format in one shift: the planar
  layout puts channel i*W + j in word j at bits p*i, so shifting the word
  block by every p*i and flattening (i, j) restores channel order."""
  (p,) = fmt.planes
  words = words_ref[rows, :]                                    # [bs, W]
  shifts = p * jax.lax.broadcasted_iota(jnp.uint32, (32 // p, 1, 1), 0)
  codes = (words[None, :, :] >> shifts) & ((1 << p) - 1)        # [n, bs, W]
  return jnp.transpose(codes, (1, 0, 2)).reshape(
      words.shape[0], head_dim).astype(jnp.int32)


def _dense_tile(words_ref, scale_ref, zero_ref, rows, fmt, head_dim, dtype):
  """Dequantized [bs, Hd] in ``dtype`` (groups narrower than the head)."""
  codes = _tile(words_ref, rows, fmt, head_dim).astype(jnp.float32)
  groups = scale_ref.shape[-1]
  expand = lambda a: jnp.broadcast_to(
      a.astype(jnp.float32)[:, :, None],
      (a.shape[0], groups, head_dim // groups)).reshape(a.shape[0], head_dim)
  return (codes * expand(scale_ref[rows, :])
          + expand(zero_ref[rows, :])).astype(dtype)


def _dot(a, b, contract, dtype):
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype),
                             (contract, ((), ())), precision=_precision(dtype),
                             preferred_element_type=jnp.float32)


def _precision(dtype):
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


def _kernel(q_ref, qpos_ref, pos_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref,
            vz_ref, acc_ref, m_ref, l_ref, logits_ref, *, fmt: Format,
            group_size: int, block_s: int):
  # q_ref [G, Hd]; qpos_ref [1]; pos_ref [split]; k/v words [split, W];
  # k/v scale, zero [split, Hd/g]; acc_ref [G, Hd]; m_ref, l_ref [G];
  # logits_ref [Go, split] (Go <= G real rows written)
  heads, head_dim = q_ref.shape
  rows_out = logits_ref.shape[0]
  dtype = q_ref.dtype
  width = fmt.chunk(head_dim)
  per_group = group_size // width
  groups = head_dim // group_size
  q_pos = jnp.max(qpos_ref[...])
  tiled = len(fmt.planes) == 1 and heads >= 16
  if tiled:
    q_all = q_ref[...]
    q_sum = jnp.sum(q_all.astype(jnp.float32), axis=1)[:, None]
  else:
    qc = [q_ref[:, pl.ds(c * width, width)] for c in range(head_dim // width)]
    # Keys dequantize as code * scale + zero per (slot, group): fold both out
    # of the dot, q·k = scale * (q·code) + zero * sum(q over the group).
    qsum = [sum(jnp.sum(qc[c].astype(jnp.float32), axis=1)
                for c in range(gi * per_group, (gi + 1) * per_group))
            for gi in range(groups)]
  row = jax.lax.broadcasted_iota(jnp.int32, (heads, block_s), 0)


  def scores(rows):
    """[G, bs] q·k of the block's slots (before the 1/sqrt(Hd) scale)."""
    if tiled and groups == 1:
      # one scale and zero per slot: fold them out of the product
      dots = _dot(q_all, _tile(kw_ref, rows, fmt, head_dim), ((1,), (1,)),
                  dtype)
      return (dots * ks_ref[rows, 0].astype(jnp.float32)[None, :]
              + q_sum * kz_ref[rows, 0].astype(jnp.float32)[None, :])
    if tiled:
      keys = _dense_tile(kw_ref, ks_ref, kz_ref, rows, fmt, head_dim, dtype)
      return _dot(q_all, keys, ((1,), (1,)), dtype)
    keys = ChunkReader(kw_ref, fmt, head_dim, rows)
    logits = None
    for gi in range(groups):
      dots = None
      for c in range(gi * per_group, (gi + 1) * per_group):
        d = _qk(qc[c], keys.codes(c), dtype)
        dots = d if dots is None else dots + d
      scale = ks_ref[rows, gi].astype(jnp.float32)[None, :]
      zero = kz_ref[rows, gi].astype(jnp.float32)[None, :]
      part = dots * scale + qsum[gi][:, None] * zero
      logits = part if logits is None else logits + part
    return logits

  def weighted_values(p, rows, accs):
    """accs * 1 + p @ values of the block, per chunk (or one whole tile)."""
    if tiled and groups == 1:
      scale = vs_ref[rows, 0].astype(jnp.float32)[None, :]
      zero = vz_ref[rows, 0].astype(jnp.float32)[None, :]
      return (accs[0] + _dot(p * scale, _tile(vw_ref, rows, fmt, head_dim),
                             ((1,), (0,)), dtype)
              + jnp.sum(p * zero, axis=1)[:, None],)
    if tiled:
      values = _dense_tile(vw_ref, vs_ref, vz_ref, rows, fmt, head_dim, dtype)
      return (accs[0] + _dot(p, values, ((1,), (0,)), dtype),)
    values = ChunkReader(vw_ref, fmt, head_dim, rows)
    new = []
    for gi in range(groups):
      scale = vs_ref[rows, gi].astype(jnp.float32)[None, :]
      zero = vz_ref[rows, gi].astype(jnp.float32)[None, :]
      p_scaled = p * scale
      p_zero = jnp.sum(p * zero, axis=1)[:, None]
      for c in range(gi * per_group, (gi + 1) * per_group):
        new.append(accs[c] + _pv(p_scaled, values.codes(c), dtype) + p_zero)
    return tuple(new)

  def body(i, carry):
    m, l, accs = carry
    start = pl.multiple_of(i * block_s, block_s)
    rows = pl.ds(start, block_s)
    pos = pos_ref[rows]
    visible = ((pos >= 0) & (pos <= q_pos))[None, :]
    logits = jnp.where(visible, scores(rows) * (head_dim ** -0.5), MASKED)
    if rows_out == heads:
      logits_ref[:, rows] = logits
    else:
      for g in range(rows_out):
        logits_ref[pl.ds(g, 1), rows] = jnp.sum(
            jnp.where(row == g, logits, 0.0), axis=0)[None, :]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    accs = tuple(a * alpha[:, None] for a in accs)
    return m_new, l, weighted_values(p, rows, accs)

  init = (jnp.full((heads,), MASKED, jnp.float32),
          jnp.zeros((heads,), jnp.float32),
          (jnp.zeros((heads, head_dim), jnp.float32),) if tiled else
          tuple(jnp.zeros((heads, width), jnp.float32)
                for _ in range(head_dim // width)))
  m, l, accs = jax.lax.fori_loop(0, pos_ref.shape[0] // block_s, body, init)
  m_ref[...] = m
  l_ref[...] = l
  if tiled:
    acc_ref[...] = accs[0]
  else:
    for c, acc in enumerate(accs):
      acc_ref[:, pl.ds(c * width, width)] = acc


def _build(batch: int, rows: int, heads: int, rows_out: int, slots: int,
           head_dim: int, fmt: Format, group_size: int, block_s: int,
           split: int, num_warps: int, interpret: bool):
  splits = slots // split
  words = fmt.words(head_dim)
  groups = head_dim // group_size
  per_slot = lambda b, r, j: (b, r, j, 0)
  packed = [pl.BlockSpec((None, None, split, words), per_slot),
            pl.BlockSpec((None, None, split, groups), per_slot),
            pl.BlockSpec((None, None, split, groups), per_slot)]
  return pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, group_size=group_size,
                        block_s=block_s),
      grid=(batch, rows, splits),
      in_specs=[pl.BlockSpec((None, None, heads, head_dim),
                             lambda b, r, j: (b, r, 0, 0)),
                pl.BlockSpec((None, 1), lambda b, r, j: (b, 0)),
                pl.BlockSpec((None, None, split), lambda b, r, j: (b, r, j)),
                *packed, *packed],
      out_specs=[pl.BlockSpec((None, None, None, heads, head_dim),
                              lambda b, r, j: (b, r, j, 0, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 pl.BlockSpec((None, None, rows_out, split),
                              lambda b, r, j: (b, r, 0, j))],
      out_shape=[
          jax.ShapeDtypeStruct((batch, rows, splits, heads, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, splits, heads), jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, splits, heads), jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, rows_out, slots), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret)


def _merge(acc, m, l):
  """Combines per-block softmax states [B, R, nb, G(, Hd)] → (out, lse)."""
  top = jnp.max(m, axis=2)
  w = jnp.exp(m - top[:, :, None])
  total = jnp.sum(w * l, axis=2)
  acc = jnp.sum(w[..., None] * acc, axis=2)
  some = total > 0
  out = acc / jnp.where(some, total, 1.0)[..., None]
  lse = jnp.where(some, top + jnp.log(jnp.where(some, total, 1.0)), MASKED)
  return out, lse


def decode_attention_reference(q, q_pos, slot_pos, k_words, k_scale, k_zero,
                               v_words, v_scale, v_zero, *, fmt: Format,
                               group_size: int, block_s: int = 64,
                               split_s: int = 1024, num_warps: int = 4,
                               interpret: bool | None = None):
  del block_s, split_s, num_warps, interpret
  head_dim = q.shape[-1]
  keys = schemes.dequantize(k_words, k_scale, k_zero, fmt, group_size,
                            head_dim)
  values = schemes.dequantize(v_words, v_scale, v_zero, fmt, group_size,
                              head_dim)
  visible = (slot_pos >= 0) & (slot_pos <= q_pos[:, None, None])  # [B, R, S]
  logits = jnp.einsum("BRGH,BRSH->BRGS", q.astype(jnp.float32), keys,
                      precision=jax.lax.Precision.HIGHEST) * head_dim ** -0.5
  logits = jnp.where(visible[:, :, None], logits, MASKED)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(visible[:, :, None], jnp.exp(logits - m), 0.0)
  total = jnp.sum(p, axis=-1)
  some = total > 0
  out = jnp.einsum("BRGS,BRSH->BRGH", p, values,
                   precision=jax.lax.Precision.HIGHEST)
  out = out / jnp.where(some, total, 1.0)[..., None]
  lse = jnp.where(some, m[..., 0] + jnp.log(jnp.where(some, total, 1.0)),
                  MASKED)
  return out, lse, logits


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_s", "split_s", "num_warps", "interpret"))
def decode_attention(q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words,
                     v_scale, v_zero, *, fmt: Format, group_size: int,
                     block_s: int = 64, split_s: int = 1024,
                     num_warps: int = 4, interpret: bool | None = None):
  """Attention of one query per sequence over packed keys and values.

  Args:
    q: [B, R, G, Hd] rotated queries grouped by cache row (kv head).
    q_pos: [B] int32 query positions; a slot is visible when its position
      is in [0, q_pos].
    slot_pos: [B, R, S] int32 original position per slot (-1 = skip).
    k_words, v_words: [B, R, S, W] uint32 packed codes (``fmt``).
    k_scale, k_zero, v_scale, v_zero: [B, R, S, Hd/g] float16.
    fmt, group_size: the int format and its group.
    block_s: slots per loop step of a program (a power of two).
    split_s: slots per program (a multiple of block_s; S is padded to a
      multiple); the programs' partial results are merged after.
    num_warps: Triton warps per program.
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    out [B, R, G, Hd] float32, softmax-normalised over this cache's visible
    slots; lse [B, R, G] float32 (-1e30 when nothing is visible); logits
    [B, R, G, S] float32, scaled by 1/sqrt(Hd), -1e30 where masked.
  """
  batch, rows, heads, head_dim = q.shape
  slots = slot_pos.shape[-1]
  fmt.check(head_dim, group_size)
  backend = choose("decode_attention", interpret)
  if fmt.kind != "int" or backend == "reference":
    return decode_attention_reference(
        q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words, v_scale,
        v_zero, fmt=fmt, group_size=group_size)
  block = min(floor_pow2(block_s), next_pow2(slots))
  split = min(max(block, split_s // block * block), -(-slots // block) * block)
  padded = -(-slots // split) * split
  # Query heads padded to 16 rows feed tensor-core dots (one-plane formats
  # unpack whole [block, Hd] tiles; others need 16-channel chunks); only the
  # real rows' logits are written.
  wide = len(fmt.planes) == 1 or fmt.chunk(head_dim) >= 16
  g_pad = max(16, next_pow2(heads)) if wide else next_pow2(heads)
  rows_out = next_pow2(heads)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, g_pad - heads), (0, 0)))
  if padded != slots:
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, padded - slots), (0, 0)))
    k_words, k_scale, k_zero, v_words, v_scale, v_zero = map(
        pad, (k_words, k_scale, k_zero, v_words, v_scale, v_zero))
    slot_pos = jnp.pad(slot_pos, ((0, 0), (0, 0), (0, padded - slots)),
                       constant_values=-1)
  acc, m, l, logits = _build(
      batch, rows, g_pad, rows_out, padded, head_dim, fmt, group_size, block,
      split, num_warps, backend == "interpret")(
          q, q_pos.astype(jnp.int32)[:, None], slot_pos.astype(jnp.int32),
          k_words, k_scale, k_zero, v_words, v_scale, v_zero)
  out, lse = _merge(acc, m, l)
  return out[:, :, :heads], lse[:, :, :heads], logits[:, :, :heads, :slots]
