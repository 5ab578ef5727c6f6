"""Fused decode attention over a packed cache (grouped-query, split-K).

One query token per sequence. For each (sequence b, cache row r) the G query
heads sharing that kv head attend over S slots. The grid splits S into
blocks of ``block_s`` slots (flash-decoding): each program unpacks its block
of keys and values straight from the packed words with their scales, and
writes its partial softmax state (max m, sum l, unnormalised output acc) plus
the block's logits; a small jnp epilogue merges the blocks. The logits let
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


def _kernel(q_ref, qpos_ref, pos_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref,
            vz_ref, acc_ref, m_ref, l_ref, logits_ref, *, fmt: Format,
            group_size: int):
  # q_ref [G, Hd]; qpos_ref [1]; pos_ref [bs]; k/v words [bs, W];
  # k/v scale, zero [bs, Hd/g]; acc_ref [G, Hd]; m_ref, l_ref [G];
  # logits_ref [G, bs]
  head_dim = q_ref.shape[-1]
  pos = pos_ref[...]
  visible = (pos >= 0) & (pos <= jnp.max(qpos_ref[...]))
  keys = ChunkReader(kw_ref, fmt, head_dim)
  width = keys.chunk
  logits = None
  for c in range(keys.num_chunks()):
    gi = c * width // group_size
    k = (keys.codes(c).astype(jnp.float32)
         * ks_ref[:, pl.ds(gi, 1)].astype(jnp.float32)
         + kz_ref[:, pl.ds(gi, 1)].astype(jnp.float32))          # [bs, w]
    qc = q_ref[:, pl.ds(c * width, width)].astype(jnp.float32)   # [G, w]
    part = jnp.sum(qc[:, None, :] * k[None, :, :], axis=2)        # [G, bs]
    logits = part if logits is None else logits + part
  logits = jnp.where(visible[None, :], logits * (head_dim ** -0.5), MASKED)
  logits_ref[...] = logits
  m = jnp.max(logits, axis=1)
  p = jnp.where(visible[None, :], jnp.exp(logits - m[:, None]), 0.0)
  m_ref[...] = m
  l_ref[...] = jnp.sum(p, axis=1)
  values = ChunkReader(vw_ref, fmt, head_dim)
  for c in range(values.num_chunks()):
    gi = c * width // group_size
    v = (values.codes(c).astype(jnp.float32)
         * vs_ref[:, pl.ds(gi, 1)].astype(jnp.float32)
         + vz_ref[:, pl.ds(gi, 1)].astype(jnp.float32))          # [bs, w]
    acc_ref[:, pl.ds(c * width, width)] = jnp.sum(
        p[:, :, None] * v[None, :, :], axis=1)


def _build(batch: int, rows: int, heads: int, slots: int, head_dim: int,
           fmt: Format, group_size: int, block_s: int, num_warps: int,
           interpret: bool):
  blocks = slots // block_s
  words = fmt.words(head_dim)
  groups = head_dim // group_size
  per_slot = lambda b, r, j: (b, r, j, 0)
  packed = [pl.BlockSpec((None, None, block_s, words), per_slot),
            pl.BlockSpec((None, None, block_s, groups), per_slot),
            pl.BlockSpec((None, None, block_s, groups), per_slot)]
  return pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, group_size=group_size),
      grid=(batch, rows, blocks),
      in_specs=[pl.BlockSpec((None, None, heads, head_dim),
                             lambda b, r, j: (b, r, 0, 0)),
                pl.BlockSpec((None, 1), lambda b, r, j: (b, 0)),
                pl.BlockSpec((None, None, block_s), lambda b, r, j: (b, r, j)),
                *packed, *packed],
      out_specs=[pl.BlockSpec((None, None, None, heads, head_dim),
                              lambda b, r, j: (b, r, j, 0, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 pl.BlockSpec((None, None, heads, block_s),
                              lambda b, r, j: (b, r, 0, j))],
      out_shape=[
          jax.ShapeDtypeStruct((batch, rows, blocks, heads, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, blocks, heads), jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, blocks, heads), jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, heads, slots), jnp.float32)],
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
                               group_size: int, block_s: int = 128,
                               num_warps: int = 4,
                               interpret: bool | None = None):
  del block_s, num_warps, interpret
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
    "fmt", "group_size", "block_s", "num_warps", "interpret"))
def decode_attention(q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words,
                     v_scale, v_zero, *, fmt: Format, group_size: int,
                     block_s: int = 128, num_warps: int = 4,
                     interpret: bool | None = None):
  """Attention of one query per sequence over packed keys and values.

  Args:
    q: [B, R, G, Hd] rotated queries grouped by cache row (kv head).
    q_pos: [B] int32 query positions; a slot is visible when its position
      is in [0, q_pos].
    slot_pos: [B, R, S] int32 original position per slot (-1 = skip).
    k_words, v_words: [B, R, S, W] uint32 packed codes (``fmt``).
    k_scale, k_zero, v_scale, v_zero: [B, R, S, Hd/g] float16.
    fmt, group_size: the int format and its group.
    block_s: slots per program (a power of two; S is padded to a multiple).
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
  padded = -(-slots // block) * block
  g_pad = next_pow2(heads)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, g_pad - heads), (0, 0)))
  if padded != slots:
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, padded - slots), (0, 0)))
    k_words, k_scale, k_zero, v_words, v_scale, v_zero = map(
        pad, (k_words, k_scale, k_zero, v_words, v_scale, v_zero))
    slot_pos = jnp.pad(slot_pos, ((0, 0), (0, 0), (0, padded - slots)),
                       constant_values=-1)
  acc, m, l, logits = _build(
      batch, rows, g_pad, padded, head_dim, fmt, group_size, block, num_warps,
      backend == "interpret")(
          q, q_pos.astype(jnp.int32)[:, None], slot_pos.astype(jnp.int32),
          k_words, k_scale, k_zero, v_words, v_scale, v_zero)
  out, lse = _merge(acc, m, l)
  return out[:, :, :heads], lse[:, :, :heads], logits[:, :, :heads, :slots]
