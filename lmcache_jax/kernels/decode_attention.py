"""Fused decode attention over a packed cache (grouped-query, split-K).

``decode_attention`` takes one query per sequence, q [B, R, G, Hd] float32
or bfloat16 (for each cache row R, a kv head, its G query heads), the query
positions [B] int32 and, per slot, its position [B, R, S] int32 (-1 =
empty) and its key and value as a format of ``numerics.formats`` stores
them: words [B, R, S, W], scales and zero codes [B, R, S, Hd/group_size].
A slot is visible when its position is in [0, q_pos]. It returns out
[B, R, G, Hd] and lse [B, R, G] float32 over the visible slots, and every
slot's logit as ``BlockLogits``.

Exactness against ``decode_attention_reference`` (dequantize, then the
float32 attention of ``dense_decode_attention``): out and lse to float32
rounding for float32 queries (bfloat16 queries also round the
probabilities to bfloat16); each visible logit within
``LOGIT_OFFSET_PRECISION`` of its distance below its block's max; masked
logits exactly ``MASKED``, and lse ``MASKED`` where nothing is visible.

Backend (``backend.choose``): the Triton lowering on GPU, interpret mode
when asked (the CPU tests), otherwise the reference, named once in the log
(also for formats without a kernel, such as fp8).

Method: a program per (sequence, row, ``split_s`` slots) loops over blocks
of ``block_s`` slots with an online softmax; the packed words are read as
16- or 8-bit lanes whose fields go into the mantissa of bfloat16 1.0
(``_lane_tiles``), scales and zeros are folded out of the products, the
query is permuted into the lanes' channel order (``lane_order``) and the
output back; a jnp epilogue merges the programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose, floor_pow2, next_pow2
from lmcache_jax.kernels.masking import MASKED, visible
from lmcache_jax.numerics import formats, schemes
from lmcache_jax.numerics.formats import Format

# Relative precision of the logits' float16 offsets from their block's max.
LOGIT_OFFSET_PRECISION = 2.0 ** -11


def lane_bits(fmt: Format, head_dim: int) -> int:
  """Width of the lanes the packed words are read in: 16 bits (a pair of
  codes per register, straight into a bfloat16 pair) where every plane's
  lane tiles stay at least 32 columns wide, else bytes (16-column tiles
  would double the products per block). 8-bit codes are read as bytes,
  each byte a code."""
  if fmt.bits == 8 or any(head_dim * bits // 16 < 32 for bits in fmt.planes):
    return 8
  return 16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["offsets", "block_max"], meta_fields=["slots"])
@dataclasses.dataclass(frozen=True)
class BlockLogits:
  """Per-slot logits as the kernel writes them: ``offsets`` [B, R, G, S']
  from each block's running max (float16, ≤ 0) and those maxima
  ``block_max`` [B, R, G, S'/block] float32; the first ``slots`` of S' are
  the cache's. ``dense()`` adds them back: inside a jit, XLA fuses that
  into whatever reads the logits next, so the float32 logits never reach
  memory."""
  offsets: jax.Array
  block_max: jax.Array
  slots: int

  def dense(self) -> jax.Array:
    """[B, R, G, slots] float32 logits, MASKED where masked."""
    block = self.offsets.shape[-1] // self.block_max.shape[-1]
    logits = (self.offsets.astype(jnp.float32)
              + jnp.repeat(self.block_max, block, axis=-1))
    # a masked slot's offset from a real max is -inf in float16
    return jnp.maximum(logits, MASKED)[..., :self.slots]


def _lane_channel(b, h: int, bits: int, head_dim: int, lane: int):
  """Channel in column ``b`` (an array) of lane tile ``h``.

  Lane ``b`` of a p-bit plane read in ``lane``-bit lanes is lane
  ``b % (32/lane)`` of word ``b // (32/lane)``; its field ``h`` is field
  ``k = (b % (32/lane)) * lane/p + h`` of the word, i.e. channel
  ``k * W + b // (32/lane)`` (``numerics.formats``: channel d sits in word
  d % W at bit p·(d // W)).
  """
  per_word = 32 // lane
  return (((b % per_word) * (lane // bits) + h) * (head_dim * bits // 32)
          + b // per_word)


def planes(fmt: Format, head_dim: int) -> list[tuple[int, int, int]]:
  """(bits p, first byte, low bit) of each plane of a packed head vector:
  the plane's Hd·p/8 bytes hold bits low..low+p of every code."""
  out, first, low = [], 0, 0
  for bits in fmt.planes:
    out.append((bits, first, low))
    first += head_dim * bits // 8
    low += bits
  return out


def lane_order(fmt: Format, head_dim: int) -> np.ndarray:
  """Channel held by each column of the lane tiles: lanes concatenated,
  planes concatenated (every channel once per plane)."""
  lane = lane_bits(fmt, head_dim)
  return np.concatenate([
      _lane_channel(np.arange(head_dim * bits // lane), h, bits, head_dim,
                    lane)
      for bits, _, _ in planes(fmt, head_dim) for h in range(lane // bits)])


def _dot(a, b, contract, dtype):
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype),
                             (contract, ((), ())), precision=_precision(dtype),
                             preferred_element_type=jnp.float32)


def _precision(dtype):
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


def _qk(q, codes, dtype):
  """[G, w] x [bs, w] codes → [G, bs] float32, on tensor cores when wide enough."""
  if q.shape[1] >= 16:
    return _dot(q, codes, ((1,), (1,)), dtype)
  return jnp.sum(q.astype(jnp.float32)[:, None, :]
                 * codes.astype(jnp.float32)[None, :, :], axis=2)


def _pv(p, codes, dtype):
  """[G, bs] x [bs, w] codes → [G, w] float32."""
  if codes.shape[1] >= 16:
    return _dot(p, codes, ((1,), (0,)), dtype)
  return jnp.sum(p[:, :, None] * codes.astype(jnp.float32)[None, :, :], axis=1)


# A code c of p < 8 bits written into the top mantissa bits of bfloat16 1.0
# gives 1 + c / 2**p exactly: a shift and one AND/OR per pair of codes
# instead of int→float conversions (those run at a quarter of the ALU rate
# and bounded this kernel). The products then carry 1 · (a row sum of the
# other operand), which the kernel subtracts once per row; the code sits
# high in the mantissa so that this surplus stays of the size of the
# products (little float32 cancellation). 8-bit codes are read as they are.
_BF16_ONE = 0x3F80


def tile_base(bits: int) -> float:
  """What a lane tile adds to every scaled code: 1, or 0 for 8-bit codes."""
  return 0.0 if bits == 8 else 1.0


def plane_weight(bits: int, low: int) -> float:
  """Weight of a p-bit plane's tile values in a code: the plane holds bits
  low..low+p, and its tiles hold code / 2**p (exact powers of two)."""
  return 2.0 ** (low + (0 if bits == 8 else bits))


def _lane_tiles(raw, bits: int, ptx: bool):
  """Code tiles [bs, Hd·p/L] (bfloat16, 1 + field / 2**p) of a plane read
  as L-bit lanes [bs, Hd·p/L] (uint16 or uint8): field h of every lane.

  On the GPU (``ptx``) inline PTX does it per 32-bit register: a 16-bit
  lane pair takes a shift and one AND/OR into a bfloat16 pair; four bytes
  take two byte permutes as well (to spread them into 16-bit halves). The
  jnp form (interpret mode) computes the same bits."""
  if bits == 8:
    return [raw]   # codes 0..255 are exact in bfloat16
  lane = raw.dtype.itemsize * 8
  mask = ((1 << bits) - 1) << (7 - bits)   # the top p of 7 mantissa bits
  if not ptx:
    raw = raw.astype(jnp.uint16)
    return [jax.lax.bitcast_convert_type(
        (_shift(raw, bits * h - (7 - bits)) & mask) | _BF16_ONE,
        jnp.bfloat16) for h in range(lane // bits)]
  pair = lambda half: half | half << 16
  field = f"{pair(mask)}, {pair(_BF16_ONE)}, 0xEA"   # (t & mask) | 1.0
  tiles = []
  for h in range(lane // bits):
    # the field moves to the top mantissa bits of its 16-bit half (or
    # byte); what a shift carries in from a neighbour falls outside the mask
    by = bits * h - (7 - bits)
    word = "$1" if lane == 16 else "$2"
    shift = (f"shr.b32 t, {word}, {by};" if by >= 0
             else f"shl.b32 t, {word}, {-by};")
    if lane == 16:
      asm = f"{{ .reg .b32 t; {shift} lop3.b32 $0, t, {field}; }}"
      constraints, pack = "=r,r", 2
    else:   # bytes 0,1 (2,3) → the low halves of two 16-bit lanes
      asm = f"""{{
        .reg .b32 t, lo, hi;
        {shift}
        prmt.b32 lo, t, 0, 0x4140;
        prmt.b32 hi, t, 0, 0x4342;
        lop3.b32 $0, lo, {field};
        lop3.b32 $1, hi, {field};
      }}"""
      constraints, pack = "=r,=r,r", 4
    [tile] = plgpu.elementwise_inline_asm(
        asm, args=[raw], constraints=constraints, pack=pack,
        result_shape_dtypes=[jax.ShapeDtypeStruct(raw.shape, jnp.bfloat16)])
    tiles.append(tile)
  return tiles


def _shift(x, by: int):
  """x >> by, or x << -by."""
  return x >> by if by >= 0 else x << -by


def _lane_group(h: int, bits: int, head_dim: int, group_size: int,
                lane: int):
  """[1, Hd·p/L] channel group of every column of lane tile h of a p-bit
  plane (computed in the kernel: Triton kernels take no array constants)."""
  b = jax.lax.broadcasted_iota(jnp.int32, (1, head_dim * bits // lane), 1)
  return _lane_channel(b, h, bits, head_dim, lane) // group_size


def _visible_logits(dots, pos, q_pos, head_dim: int):
  """Scaled logits of a block, masked where a slot is empty or after the
  query, and the [1, bs] mask."""
  seen = visible(pos, q_pos)[None, :]
  return jnp.where(seen, dots * (head_dim ** -0.5), MASKED), seen


def _softmax_step(m, l, logits, visible):
  """Online softmax: new (max, sum, factor rescaling the accumulators,
  probabilities)."""
  m_new = jnp.maximum(m, jnp.max(logits, axis=1))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
  l = l * alpha + jnp.sum(p, axis=1)
  return m_new, l, alpha, p


def _write_offsets(offsets_ref, i, block_s: int, logits, m, real: int):
  """Stores block ``i``'s logits of the ``real`` query heads as float16
  offsets from the running max ``m`` (≤ 0: exact to 2**-11 of their size,
  so the slots that carry attention mass keep float32-like precision at
  half the bytes); ``_store_rows`` maps the padding rows."""
  _store_rows(offsets_ref, _block_rows(i, block_s),
              (logits - m[:, None]).astype(offsets_ref.dtype), real)


def _store_rows(ref, columns, x, real: int):
  """ref[:real, columns] = x[:real]. The padding rows repeat the real heads
  cyclically, so row r goes to head r % real: rows storing to the same
  address store the same value."""
  if x.shape[0] == ref.shape[0] == real:
    ref[:, columns] = x
    return
  head = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0],), 0) % real
  ref[head, columns] = x


def _block_rows(i, block_s: int):
  """Slots of loop block ``i``."""
  return pl.ds(pl.multiple_of(i * block_s, block_s), block_s)


def _per_slot(ref, rows, group: int):
  """[1, bs] float32 scales (or zero codes) of one channel group for a block."""
  return ref[rows, group].astype(jnp.float32)[None, :]


def _per_row(ref, rows, row_group, groups: int):
  """[M, bs] (or [1, bs] for one group) float32 scale or zero code of each
  product row's channel group, for a block."""
  out = _per_slot(ref, rows, 0)
  for gi in range(1, groups):
    out = jnp.where(row_group == gi, _per_slot(ref, rows, gi), out)
  return out


def _sum_groups(x, groups: int):
  """[groups·n, ...] → [n, ...]: row r summed over the group blocks."""
  if groups == 1:
    return x
  return x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).sum(axis=0)


def _spread_groups(x, groups: int):
  """[n, ...] → [groups·n, ...]: the rows repeated in every group block."""
  if groups == 1:
    return x
  return jnp.broadcast_to(x[None], (groups, *x.shape)).reshape(
      groups * x.shape[0], *x.shape[1:])


def _lanes_kernel(q_ref, qpos_ref, pos_ref, kb_ref, ks_ref, kz_ref, vb_ref,
                  vs_ref, vz_ref, acc_ref, m_ref, l_ref, *logits_refs,
                  fmt: Format, group_size: int, block_s: int,
                  real_heads: int, ptx: bool):
  """q_ref [M, P·Hd]: M = groups·n product rows; rows gi·n .. gi·n+n hold
  the query heads (repeated cyclically) restricted to channel group gi, for
  each of the P planes in that plane's lane order times its
  ``plane_weight``. k/v lanes [split, Hd·b/L]; k/v scale and zero
  [split, Hd/g]; acc_ref [n, P·Hd]: per plane, Σ p · field in lane order
  (the wrapper weights and sums the planes); m_ref, l_ref [n]; when the
  caller wants logits, logits_refs = (float16 offsets [Go, split], block
  maxima [Go, split / block_s]): see ``_write_offsets``. ``ptx``: unpack
  with inline PTX (GPU) rather than jnp (interpret mode).

  Each row's products see only its group's channels, so one product per
  lane tile serves every group: the rows are scaled by their group's scale,
  and a head's logits are the sum of its rows over the group blocks. The
  probabilities go back to every block, scaled by the block's value scale;
  at the end each output column is taken from its own group's block.
  """
  num_rows, _ = q_ref.shape
  head_dim = acc_ref.shape[-1] // len(fmt.planes)
  groups = head_dim // group_size
  heads = num_rows // groups
  dtype = q_ref.dtype
  lane = kb_ref.dtype.itemsize * 8
  layout = planes(fmt, head_dim)
  widths = [head_dim * bits // lane for bits, _, _ in layout]
  lanes = [(j, h) for j, (bits, _, _) in enumerate(layout)
           for h in range(lane // bits)]
  row_group = jax.lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0) // heads
  q_pos = jnp.max(qpos_ref[...])
  q_lanes = [q_ref[:, pl.ds(j * head_dim + h * widths[j], widths[j])]
             for j, h in lanes]
  # Plane j's tiles hold base + code_j / 2**p and its query copy is times
  # w_j = plane_weight, so a product carries base · Σ_j w_j · Σq on top of
  # q·code; with the zero (scale · share · zero code, numerics.schemes) each
  # row's correction per slot is (share · zero code - base · Σ w) · Σq,
  # taken from the row's plane-0 copy (every own channel once, times w_0).
  # The same correction, weighted by the probabilities, completes p·v.
  share = formats.zero_share(fmt.bits)
  surplus = tile_base(fmt.bits) * sum(
      plane_weight(bits, low) for bits, _, low in layout)
  w0 = plane_weight(layout[0][0], layout[0][2])
  q_sum = jnp.sum(q_ref[:, pl.ds(0, head_dim)].astype(jnp.float32),
                  axis=1)[:, None]

  def tiles(ref, rows):
    per_plane = [_lane_tiles(ref[rows, pl.ds(first * 8 // lane, width)],
                             bits, ptx)
                 for (bits, first, _), width in zip(layout, widths)]
    return [per_plane[j][h] for j, h in lanes]

  def correction(zero_ref, rows):
    return (share * _per_row(zero_ref, rows, row_group, groups)
            - surplus) / w0

  def body(i, carry):
    m, l, fix, accs, maxima = carry
    rows = _block_rows(i, block_s)
    pos = pos_ref[rows]
    dots = sum(_qk(q, codes, dtype)
               for q, codes in zip(q_lanes, tiles(kb_ref, rows)))
    logits = _sum_groups(
        _per_row(ks_ref, rows, row_group, groups)
        * (dots + q_sum * correction(kz_ref, rows)), groups)
    logits, seen = _visible_logits(logits, pos, q_pos, head_dim)
    m, l, alpha, p = _softmax_step(m, l, logits, seen)
    if logits_refs:
      _write_offsets(logits_refs[0], i, block_s, logits, m, real_heads)
      maxima = jnp.where(block_index == i, m[:, None], maxima)
    alpha = _spread_groups(alpha[:, None], groups)
    # p @ values = (p · scale) @ tiles + Σ (p · scale) · correction: the
    # second term per row, accumulated apart and added to plane 0 at the end
    p_scaled = (_spread_groups(p, groups)
                * _per_row(vs_ref, rows, row_group, groups)).astype(dtype)
    fix = fix * alpha + jnp.sum(
        p_scaled.astype(jnp.float32) * correction(vz_ref, rows), axis=1,
        keepdims=True)
    accs = tuple(acc * alpha + _pv(p_scaled, codes, dtype)
                 for acc, codes in zip(accs, tiles(vb_ref, rows)))
    return m, l, fix, accs, maxima

  blocks = pos_ref.shape[0] // block_s
  block_index = jax.lax.broadcasted_iota(jnp.int32, (1, blocks), 1)
  init = (jnp.full((heads,), MASKED, jnp.float32),
          jnp.zeros((heads,), jnp.float32),
          jnp.zeros((num_rows, 1), jnp.float32),
          tuple(jnp.zeros((num_rows, widths[j]), jnp.float32)
                for j, _ in lanes),
          jnp.full((heads, blocks), MASKED, jnp.float32))
  m, l, fix, accs, maxima = jax.lax.fori_loop(0, blocks, body, init)
  if logits_refs:
    _store_rows(logits_refs[1], slice(None), maxima, real_heads)
  m_ref[...] = m
  l_ref[...] = l
  start = 0
  for acc, (j, h) in zip(accs, lanes):
    if j == 0:
      acc = acc + fix
    if groups > 1:   # each column from its own group's block
      own = row_group == _lane_group(h, layout[j][0], head_dim, group_size,
                                     lane)
      acc = _sum_groups(jnp.where(own, acc, 0.0), groups)
    acc_ref[:, pl.ds(start, widths[j])] = acc
    start += widths[j]


class _AtRow:
  """A pool ref [P, ...] read at one row, indexed like that row's ref."""

  def __init__(self, ref, row):
    self.ref, self.row = ref, row
    self.dtype = ref.dtype
    self.shape = ref.shape[1:]

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    return self.ref[(self.row, *index)]


def _pooled_kernel(first_ref, q_ref, qpos_ref, pos_ref, *refs, **options):
  """``_lanes_kernel`` over the codes, scales and zeros of pool row
  ``first_ref[0]`` + this program's row, read where they lie (clamped into
  the pool: a row past the layer's own is masked by the caller)."""
  pool = refs[0].shape[0]
  row = jnp.minimum(first_ref[0] + pl.program_id(1), pool - 1)
  packed = [_AtRow(ref, row) for ref in refs[:6]]
  _lanes_kernel(q_ref, qpos_ref, pos_ref, *packed, *refs[6:], **options)


def _build(batch: int, rows: int, num_rows: int, heads: int, real_heads: int,
           rows_out: int, slots: int, head_dim: int, data_width: int,
           fmt: Format, group_size: int, block_s: int, split: int,
           num_warps: int, num_stages: int, interpret: bool,
           pool: int | None = None):
  """The pallas_call: ``num_rows`` product rows (query copies), ``heads``
  rows of softmax state; ``rows_out`` = 0 leaves out the logits output.
  ``pool``: the codes, scales and zeros are a pool of that many rows
  [B, P, ...] and the first row read comes first among the inputs."""
  splits = slots // split
  width = head_dim * len(fmt.planes)   # the query and acc: one Hd per plane
  per_slot = lambda b, r, j: (b, r, j, 0)
  per_split = lambda b, r, j: (b, r, 0, j)
  logits_spec = [pl.BlockSpec((None, None, rows_out, split), per_split),
                 pl.BlockSpec((None, None, rows_out, split // block_s),
                              per_split)][:2 * bool(rows_out)]
  logits_shape = [
      jax.ShapeDtypeStruct((batch, rows, rows_out, slots), jnp.float16),
      jax.ShapeDtypeStruct((batch, rows, rows_out, slots // block_s),
                           jnp.float32)][:2 * bool(rows_out)]
  widths = (data_width, head_dim // group_size, head_dim // group_size)
  if pool is None:
    packed = [pl.BlockSpec((None, None, split, w), per_slot) for w in widths]
    kernel, first = _lanes_kernel, []
  else:
    packed = [pl.BlockSpec((None, pool, split, w),
                           lambda b, r, j: (b, 0, j, 0)) for w in widths]
    kernel = _pooled_kernel
    first = [pl.BlockSpec((1,), lambda b, r, j: (0,))]
  return pl.pallas_call(
      functools.partial(kernel, fmt=fmt, group_size=group_size,
                        block_s=block_s, real_heads=real_heads,
                        ptx=not interpret),
      grid=(batch, rows, splits),
      in_specs=[*first,
                pl.BlockSpec((None, None, num_rows, width),
                             lambda b, r, j: (b, r, 0, 0)),
                pl.BlockSpec((None, 1), lambda b, r, j: (b, 0)),
                pl.BlockSpec((None, None, split), lambda b, r, j: (b, r, j)),
                *packed, *packed],
      out_specs=[pl.BlockSpec((None, None, None, heads, width),
                              lambda b, r, j: (b, r, j, 0, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 pl.BlockSpec((None, None, None, heads),
                              lambda b, r, j: (b, r, j, 0)),
                 *logits_spec],
      out_shape=[
          jax.ShapeDtypeStruct((batch, rows, splits, heads, width),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, splits, heads), jnp.float32),
          jax.ShapeDtypeStruct((batch, rows, splits, heads), jnp.float32),
          *logits_shape],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret)


def default_tiling(fmt: Format) -> tuple[int, int]:
  """(slots per loop block, Triton warps) for a format: 128-slot blocks on
  two warps for codes of at most 4 bits, 64-slot blocks on four warps for
  int8's wider tiles (the kernel suite's int4 tilings: docs/benchmarks.md)."""
  return (128, 2) if fmt.bits <= 4 else (64, 4)


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
                               group_size: int,
                               block_s: int | None = None, split_s: int = 512,
                               num_warps: int | None = None,
                               num_stages: int = 3, with_logits: bool = True,
                               interpret: bool | None = None):
  del block_s, split_s, num_warps, num_stages, interpret
  head_dim = q.shape[-1]
  keys = schemes.dequantize(k_words, k_scale, k_zero, fmt, group_size,
                            head_dim)
  values = schemes.dequantize(v_words, v_scale, v_zero, fmt, group_size,
                              head_dim)
  seen = visible(slot_pos, q_pos[:, None, None])  # [B, R, S]
  out, lse, logits = dense_decode_attention(q, keys, values, seen)
  return out, lse, (logits if with_logits else None)


def dense_decode_attention(q, keys, values, visible):
  """Float32 attention of q [B, R, G, Hd] over dense keys and values
  [B, R, S, Hd] where ``visible`` [B, R, S]: out [B, R, G, Hd], lse [B, R, G]
  (MASKED when nothing is visible) and logits [B, R, G, S] (MASKED where
  masked)."""
  hi = jax.lax.Precision.HIGHEST
  visible = visible[:, :, None]
  logits = jnp.einsum("BRGH,BRSH->BRGS", q.astype(jnp.float32),
                      keys.astype(jnp.float32), precision=hi)
  logits = jnp.where(visible, logits * q.shape[-1] ** -0.5, MASKED)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(logits - m), 0.0)
  total = jnp.sum(p, axis=-1)
  some = total > 0
  out = jnp.einsum("BRGS,BRSH->BRGH", p, values.astype(jnp.float32),
                   precision=hi)
  out = out / jnp.where(some, total, 1.0)[..., None]
  lse = jnp.where(some, m[..., 0] + jnp.log(jnp.where(some, total, 1.0)),
                  MASKED)
  return out, lse, logits


def _divisible_tiling(slots: int, block_s: int, split_s: int
                      ) -> tuple[int, int] | None:
  """(block, split) with power-of-two blocks of at most ``block_s`` slots
  (16 at least) and splits of at most ``split_s`` that both divide
  ``slots``; None when no block of 16 or more does."""
  block = floor_pow2(block_s)
  while block >= 16 and slots % block:
    block //= 2
  if block < 16:
    return None
  blocks = slots // block
  per_split = max(d for d in range(1, max(1, split_s // block) + 1)
                  if blocks % d == 0)
  return block, block * per_split


def _as_lanes(words, lane: int):
  """uint32 [..., W] → uint16 or uint8 [..., 32W/lane]: lane k of a word =
  its bits lane·k.."""
  per_word = 32 // lane
  narrow = jax.lax.bitcast_convert_type(
      words, jnp.uint16 if lane == 16 else jnp.uint8)
  return narrow.reshape(*words.shape[:-1], per_word * words.shape[-1])


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "block_s", "split_s", "num_warps", "num_stages",
    "with_logits", "interpret"))
def decode_attention(q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words,
                     v_scale, v_zero, *, fmt: Format, group_size: int,
                     block_s: int | None = None, split_s: int = 512,
                     num_warps: int | None = None, num_stages: int = 3,
                     with_logits: bool = True,
                     interpret: bool | None = None, first_row=None):
  """Attention of one query per sequence over packed keys and values.

  Args:
    q: [B, R, G, Hd] rotated queries grouped by cache row (kv head).
    q_pos: [B] int32 query positions; a slot is visible when its position
      is in [0, q_pos].
    slot_pos: [B, R, S] int32 original position per slot (-1 = skip).
    k_words, v_words: [B, R, S, W] uint32 packed codes (``fmt``).
    k_scale, v_scale: [B, R, S, Hd/g] float16; k_zero, v_zero: the uint8
      zero codes (``numerics.schemes``).
    fmt, group_size: the int format and its group.
    block_s: slots per loop step of a program (a power of two); None =
      ``default_tiling``.
    split_s: slots per program (a multiple of block_s; S is padded to a
      multiple); the programs' partial results are merged after.
    num_warps: Triton warps per program; None = ``default_tiling``.
    num_stages: pipeline stages of the block loop.
    with_logits: also return every slot's logit (for the attention mass);
      without, the kernel skips writing them.
    interpret: Pallas interpret mode (CPU tests).
    first_row: int32 scalar, or None. Given, the codes, scales and zeros
      are a row pool [B, P, S, ...] (``quant.payload``) and row r reads pool
      row ``first_row`` + r in place (taking the rows out would copy the
      bulk of the cache every step); rows past the pool read its last.

  Returns:
    out [B, R, G, Hd] float32, softmax-normalised over this cache's visible
    slots; lse [B, R, G] float32 (MASKED when nothing is visible); logits
    [B, R, G, S] float32, scaled by 1/sqrt(Hd), MASKED where masked (None
    without ``with_logits``), as ``BlockLogits``: each within
    2**-11 · (its block's max - it) of the exact value
    (``LOGIT_OFFSET_PRECISION``), stored as a float16 offset from that max.
  """
  batch, rows, heads, head_dim = q.shape
  slots = slot_pos.shape[-1]
  fmt.check(head_dim, group_size)
  backend = choose("decode_attention", interpret, fmt)
  default_block, default_warps = default_tiling(fmt)
  tiling = (None if first_row is None or backend == "reference" else
            _divisible_tiling(slots, block_s or default_block, split_s))
  pooled = tiling is not None
  if first_row is not None and not pooled:   # read the rows taken out
    at = lambda a: (None if a is None else  # noqa: E731  (fp8: no zeros)
                    jnp.take(a, first_row + jnp.arange(rows), axis=1,
                             mode="clip"))
    k_words, k_scale, k_zero, v_words, v_scale, v_zero = map(
        at, (k_words, k_scale, k_zero, v_words, v_scale, v_zero))
  if backend == "reference":
    out, lse, logits = decode_attention_reference(
        q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words, v_scale,
        v_zero, fmt=fmt, group_size=group_size, with_logits=with_logits)
    if with_logits:   # exact: offsets from a max of 0
      logits = BlockLogits(logits, jnp.zeros((*logits.shape[:-1], 1)), slots)
    return out, lse, logits
  if pooled:   # tiles that divide the slots: no padded copy of the layer
    block, split = tiling
  else:
    block = min(floor_pow2(block_s or default_block), next_pow2(slots))
    split = min(max(block, split_s // block * block),
                -(-slots // block) * block)
  padded = -(-slots // split) * split
  groups = head_dim // group_size
  # Product rows: per channel group a block of n rows holding the query
  # heads, padded to a power of two by repeating them (the kernel writes
  # their logits). Triton runs products of fewer than 16 rows on the
  # 16-row tensor-core instructions; only the registers and the softmax
  # follow the real rows.
  n = next_pow2(heads)
  num_rows = groups * n
  row_head = np.arange(num_rows) % n % heads
  row_group = np.arange(num_rows) // n
  rows_out = n if with_logits else 0
  layout = planes(fmt, head_dim)
  order = lane_order(fmt, head_dim)
  # each plane's copy carries the plane's weight (exact), so the
  # kernel sums plain products; each row sees only its group's channels
  weight = np.repeat([plane_weight(bits, low) for bits, _, low in layout],
                     head_dim)
  own = order[None, :] // group_size == row_group[:, None]
  q = jnp.where(jnp.asarray(own), q[:, :, row_head][..., order] * weight,
                0).astype(q.dtype)
  lane = lane_bits(fmt, head_dim)
  k_words, v_words = _as_lanes(k_words, lane), _as_lanes(v_words, lane)
  if padded != slots:
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, padded - slots), (0, 0)))  # noqa: E731
    k_words, k_scale, k_zero, v_words, v_scale, v_zero = map(
        pad, (k_words, k_scale, k_zero, v_words, v_scale, v_zero))
    slot_pos = jnp.pad(slot_pos, ((0, 0), (0, 0), (0, padded - slots)),
                       constant_values=-1)
  acc, m, l, *logits = _build(
      batch, rows, num_rows, n, heads, rows_out, padded, head_dim,
      k_words.shape[-1], fmt, group_size, block, split,
      num_warps or default_warps, num_stages, backend == "interpret",
      k_words.shape[1] if pooled else None)(
          *([jnp.asarray(first_row, jnp.int32).reshape(1)] if pooled else []),
          q, q_pos.astype(jnp.int32)[:, None], slot_pos.astype(jnp.int32),
          k_words, k_scale, k_zero, v_words, v_scale, v_zero)
  out, lse = _merge(acc, m, l)
  # back to channel order, each plane times its weight
  out = sum(out[..., j * head_dim + np.argsort(order[j * head_dim:
                                                     (j + 1) * head_dim])]
            * plane_weight(bits, low)
            for j, (bits, _, low) in enumerate(layout))
  if with_logits:
    offsets, block_max = logits
    logits = BlockLogits(offsets[:, :, :heads], block_max[:, :, :heads],
                         slots)
  else:
    logits = None
  return out[:, :, :heads], lse[:, :, :heads], logits
