"""Mosaic GPU prototype of the fused int4 decode attention, timed against
the Pallas Triton kernel in one process (Hopper, JAX >= 0.11):

  PYTHONPATH=. python3 experiments/benchmarks/_mosaic_decode.py

The Triton kernel runs the 4 query heads of a kv head as the 16-row operand
of mma.sync, which costs register copies (docs/benchmarks.md). Here the
roles turn: wgmma takes the unpacked codes as its 64-row operand straight
from registers and the heads as its N = 8 columns from shared memory —
S^T[slots, heads] = codes @ q^T, then out^T[channels, heads] = values^T @
p^T. TMA brings each block's packed words, scales, zero codes and
positions; no int→float conversions (a code OR-ed into the mantissa of
bfloat16 1.0, as in the Triton kernel) and no lane shuffles: each thread
reads exactly the words its wgmma fragment needs, and the channel orders
that this implies are undone on the query and the output
(``key_channel_of_column``, ``value_channel_of_row``).

A prototype for measurement, not a backend: int4 with one scale and zero
code per token and head (group 128), head dim 128, at most 8 query heads
per kv head; no per-slot logits (so no attention mass). The uint8 zero
codes go in as float16: a pipelined TMA of 1-D uint8 blocks failed at
launch (JAX 0.11.2). Checks out and lse against the jnp reference, then
times it beside ``decode_attention`` without logits at the kernel suite's
shapes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, vector

from experiments import benchmarks
from lmcache_jax.kernels import decode_attention as triton_kernel
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import FORMATS

BATCH, KV_HEADS, GROUP, HEAD_DIM, CONTEXT = 16, 8, 4, 128, 32768
FMT = FORMATS["int4"]
HEADS = 8        # wgmma N: the query heads of a kv head, zero-padded
WORDS = 16       # uint32 words of a packed int4 head vector
MASKED = triton_kernel.MASKED


def key_channel_of_column() -> np.ndarray:
  """Channel in each column of the key tile: column 8·ct + 2·t + e is
  nibble 4·e + ct % 4 of word 4·t + ct // 4 (channel d sits in word d % 16
  at nibble d // 16)."""
  c = np.arange(HEAD_DIM)
  ct, t, e = c // 8, (c % 8) // 2, c % 2
  return 16 * (4 * e + ct % 4) + 4 * t + ct // 4


def value_channel_of_row() -> np.ndarray:
  """Channel in each row of the transposed value tile: the thread holding
  rows r and r + 8 (and + 64) reads one 16-bit half of one word."""
  r = np.arange(HEAD_DIM)
  mt, warp, h, i = r // 64, (r % 64) // 16, (r % 16) // 8, r % 8
  unit = warp * 8 + i
  return unit % 16 + 16 * (4 * (unit // 16) + 2 * mt + h)


def _i32(value):
  return arith.constant(ir.IntegerType.get_signless(32), value)


def _index(value):
  return arith.index_cast(ir.IndexType.get(), value)


def _nibble_pair(word, n: int):
  """bfloat16 pair 1 + code / 16 of nibble n of both 16-bit halves of a
  word: a shift and one AND/OR."""
  by = 4 * n - 3   # nibble n to mantissa bits 3..6 of each half
  shift = f"shr.b32 t, $1, {by};" if by >= 0 else f"shl.b32 t, $1, {-by};"
  bits = llvm.inline_asm(
      ir.IntegerType.get_signless(32), [word],
      "{ .reg .b32 t; " + shift
      + " lop3.b32 $0, t, 0x00780078, 0x3F803F80, 0xEA; }", "=r,r")
  return mgpu_utils.bitcast(bits, ir.VectorType.get((2,), ir.BF16Type.get()))


def _thread():
  """(warp, lane // 4, lane % 4) of this thread in its warpgroup."""
  tid = arith.remui(mgpu_utils.thread_idx(), _i32(128))
  lane = arith.remui(tid, _i32(32))
  return (arith.divui(tid, _i32(32)), arith.divui(lane, _i32(4)),
          arith.remui(lane, _i32(4)))


def _register_tile(shape, fill):
  """An inline Mosaic function taking a shared-memory ref of packed words
  and returning bfloat16 ``shape`` in wgmma's register layout, each
  register set by ``fill(regs, ref, warp, lane // 4, lane % 4)``."""
  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct(
                         shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA))
  def tile(ctx, ref):
    del ctx
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
    fill(regs, ref, *_thread())
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT,
                              _is_signed=None)
  return tile


@functools.cache
def key_tile(block: int):
  """Packed key words [block, 16] → bfloat16 codes [block, 128]: one
  16-byte load per row."""
  quad = lambda: ir.VectorType.get((4,), ir.IntegerType.get_signless(32))

  def fill(regs, ref, warp, i, t):
    for mt in range(block // 64):
      for h in range(2):
        row = arith.addi(arith.muli(warp, _i32(16)), _i32(64 * mt + 8 * h))
        words = vector.load(quad(), ref, [_index(arith.addi(row, i)),
                                          _index(arith.muli(t, _i32(4)))])
        for ct in range(16):
          word = vector.extract(
              words, dynamic_position=[],
              static_position=ir.DenseI64ArrayAttr.get([ct // 4]))
          regs[mt, ct, 0, 0, h, 0, 0, 0, 0] = _nibble_pair(word, ct % 4)
  return _register_tile((block, HEAD_DIM), fill)


@functools.cache
def value_tile_t(block: int):
  """Packed value words [block, 16] → bfloat16 codes transposed,
  [128, block]: a thread reads its word in two consecutive slots and pairs
  their 16-bit halves (one prmt)."""
  def fill(regs, ref, warp, i, t):
    unit = arith.addi(arith.muli(warp, _i32(8)), i)
    word = _index(arith.remui(unit, _i32(16)))
    # low halves of both words (0x5410) or high halves (0x7632)
    select = arith.addi(_i32(0x5410),
                        arith.muli(arith.divui(unit, _i32(16)), _i32(0x2222)))
    for ct in range(block // 8):
      slot = arith.addi(_i32(8 * ct), arith.muli(t, _i32(2)))
      first = memref.load(ref, [_index(slot), word])
      second = memref.load(ref, [_index(arith.addi(slot, _i32(1))), word])
      pair = llvm.inline_asm(ir.IntegerType.get_signless(32),
                             [first, second, select],
                             "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r")
      for n in range(4):
        regs[n // 2, ct, 0, 0, n % 2, 0, 0, 0, 0] = _nibble_pair(pair, n)
  return _register_tile((HEAD_DIM, block), fill)


def build(rows: int, slots: int, split: int, stages: int, block: int):
  """The kernel over ``rows`` = batch·kv heads: grid (rows, slots/split),
  one warpgroup per program looping over ``block``-slot steps."""
  share = schemes.zero_share(4)
  column = plgpu.Layout.WGMMA.reduce(0)
  row = plgpu.Layout.WGMMA.reduce(1)
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  per_row = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])
  per_column = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])

  def kernel(q_gmem, qsum_gmem, qpos_gmem, pos_gmem, k_gmem, ks_gmem,
             kz_gmem, v_gmem, vs_gmem, vz_gmem, acc_gmem, ml_gmem, q_smem,
             qsum_smem, p_smem, out_smem, ml_smem, ready):
    r, j = lax.axis_index("rows"), lax.axis_index("split")
    q_pos = qpos_gmem[r // KV_HEADS]
    plgpu.copy_gmem_to_smem(q_gmem.at[r], q_smem, ready.at[0])
    plgpu.copy_gmem_to_smem(qsum_gmem.at[r], qsum_smem, ready.at[1])
    plgpu.barrier_wait(ready.at[0])
    plgpu.barrier_wait(ready.at[1])
    q_sum = plgpu.load(qsum_smem, layout=column)

    def step(_, pos_ref, k_ref, ks_ref, kz_ref, v_ref, vs_ref, vz_ref, carry):
      m, l_parts, fix_parts, acc = carry
      codes = key_tile(block)(k_ref)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, codes, q_smem.T)
        return acc_ref[...]
      dots = pl.run_scoped(qk, plgpu.ACC((block, HEADS), jnp.float32))
      shape = dots.shape
      load = lambda ref: plgpu.load(ref, layout=row).astype(jnp.float32)
      # the tiles hold 1 + code/16 and the query is times 16: subtract
      # 16·Σq and add the zero's share, per slot (as the Triton kernel)
      k_fix = (load(kz_ref) * share - 16.0) / 16.0
      logits = per_row(load(ks_ref) * HEAD_DIM ** -0.5, shape) * (
          dots + per_column(q_sum, shape) * per_row(k_fix, shape))
      pos = plgpu.load(pos_ref, layout=row)
      visible = per_row((pos >= 0) & (pos <= q_pos), shape)
      logits = jnp.where(visible, logits, MASKED)
      m_new = jnp.maximum(m, logits.max(axis=0))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(visible, jnp.exp(logits - per_column(m_new, shape)), 0.0)
      # sums over slots stay per row until the end (no cross-warp sums)
      l_parts = l_parts * per_column(alpha, shape) + p
      p = p * per_row(load(vs_ref), shape)
      v_fix = (load(vz_ref) * share - 16.0) / 16.0
      fix_parts = (fix_parts * per_column(alpha, shape)
                   + p * per_row(v_fix, shape))
      p_smem.T[...] = p.astype(jnp.bfloat16)
      plgpu.commit_smem()
      values = value_tile_t(block)(v_ref)
      acc = acc * per_column(alpha, acc.shape)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, values, p_smem.T)
      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      return m_new, l_parts, fix_parts, acc

    zeros = lambda shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32),
                                            plgpu.Layout.WGMMA)
    init = (plgpu.layout_cast(jnp.full((HEADS,), MASKED, jnp.float32), column),
            zeros((block, HEADS)), zeros((block, HEADS)),
            zeros((HEAD_DIM, HEADS)))
    vec = plgpu.BlockSpec((block,), lambda i: (i,))
    words = plgpu.BlockSpec((block, WORDS), lambda i: (i, 0))
    part = pl.ds(j * split, split)
    gmem = (pos_gmem, k_gmem, ks_gmem, kz_gmem, v_gmem, vs_gmem, vz_gmem)
    m, l_parts, fix_parts, acc = plgpu.emit_pipeline(
        step, grid=(split // block,),
        in_specs=[vec, words, vec, vec, words, vec, vec],
        max_concurrent_steps=stages, init_carry=init)(
            *[ref.at[r, part] for ref in gmem])
    out_smem[...] = acc + per_column(fix_parts.sum(axis=0), acc.shape)
    ml_smem[0] = m
    ml_smem[1] = l_parts.sum(axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, acc_gmem.at[r, j])
    plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[r, j])
    plgpu.wait_smem_to_gmem(0)

  splits = slots // split
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((rows, splits, HEAD_DIM, HEADS),
                                     jnp.float32),
                jax.ShapeDtypeStruct((rows, splits, 2, HEADS), jnp.float32)),
      grid=(rows, splits), grid_names=("rows", "split"),
      scratch_types=dict(
          q_smem=plgpu.SMEM((HEADS, HEAD_DIM), jnp.bfloat16,
                            transforms=swizzled),
          qsum_smem=plgpu.SMEM((HEADS,), jnp.float32),
          p_smem=plgpu.SMEM((HEADS, block), jnp.bfloat16,
                            transforms=swizzled),
          out_smem=plgpu.SMEM((HEAD_DIM, HEADS), jnp.float32),
          ml_smem=plgpu.SMEM((2, HEADS), jnp.float32),
          ready=plgpu.Barrier(num_barriers=2)),
      compiler_params=plgpu.CompilerParams(approx_math=True))


@functools.partial(jax.jit, static_argnames=("split", "stages", "block"))
def decode_attention(q, q_pos, slot_pos, k_words, k_scale, k_zero, v_words,
                     v_scale, v_zero, *, split=1024, stages=2, block=64):
  """``triton_kernel.decode_attention``'s inputs (int4, group 128) → out
  [B, R, G, 128], lse [B, R, G]."""
  batch, kv_heads, heads, _ = q.shape
  slots = slot_pos.shape[-1]
  rows = batch * kv_heads
  flat = lambda a: a.reshape(rows, slots, *a.shape[3:])
  as_words = lambda w: lax.bitcast_convert_type(flat(w), jnp.int32)
  per_slot = lambda a, dtype: a.reshape(rows, slots).astype(dtype)
  q16 = jnp.zeros((batch, kv_heads, HEADS, HEAD_DIM), jnp.bfloat16).at[
      :, :, :heads].set(q[..., key_channel_of_column()] * 16)
  acc, ml = build(rows, slots, split, stages, block)(
      q16.reshape(rows, HEADS, HEAD_DIM),
      q16.astype(jnp.float32).sum(-1).reshape(rows, HEADS),
      q_pos.astype(jnp.int32), slot_pos.reshape(rows, slots),
      as_words(k_words), per_slot(k_scale, jnp.float16),
      per_slot(k_zero, jnp.float16), as_words(v_words),
      per_slot(v_scale, jnp.float16), per_slot(v_zero, jnp.float16))
  m, l = ml[:, :, 0], ml[:, :, 1]
  top = m.max(1, keepdims=True)
  w = jnp.exp(m - top)
  total = (w * l).sum(1)
  out_t = (acc * w[:, :, None]).sum(1) / total[:, None] * 16
  out = jnp.zeros_like(out_t).at[:, value_channel_of_row()].set(out_t)
  out = out.transpose(0, 2, 1).reshape(batch, kv_heads, HEADS, HEAD_DIM)
  lse = (top[:, 0] + jnp.log(total)).reshape(batch, kv_heads, HEADS)
  return out[:, :, :heads], lse[:, :, :heads]


def inputs(seed: int = 0):
  """The kernel suite's shapes, quantized random keys and values, ragged
  query positions and a tenth of the slots empty."""
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (BATCH, KV_HEADS, CONTEXT, HEAD_DIM)
  quantize = jax.jit(lambda a: schemes.quantize(a, FMT, HEAD_DIM))
  kq = quantize(jax.random.normal(keys[0], shape, jnp.bfloat16))
  vq = quantize(jax.random.normal(keys[1], shape, jnp.bfloat16))
  q = jax.random.normal(keys[2], (BATCH, KV_HEADS, GROUP, HEAD_DIM),
                        jnp.bfloat16)
  q_pos = (jnp.arange(BATCH, dtype=jnp.int32) * (CONTEXT // BATCH)
           + CONTEXT // 3)
  slot_pos = jnp.broadcast_to(jnp.arange(CONTEXT, dtype=jnp.int32),
                              (BATCH, KV_HEADS, CONTEXT))
  empty = jax.random.uniform(keys[3], slot_pos.shape) < 0.1
  return (q, q_pos, jnp.where(empty, -1, slot_pos), *kq, *vq)


def main():
  args = inputs()
  want_out, want_lse, _ = jax.jit(functools.partial(
      triton_kernel.decode_attention_reference, fmt=FMT,
      group_size=HEAD_DIM, with_logits=False))(*args)
  configs = ((64, 1024, 2), (128, 1024, 2), (128, 2048, 2))
  for block, split, stages in configs:
    out, lse = decode_attention(*args, split=split, stages=stages,
                                block=block)
    print(f"check block {block}: out max|diff| "
          f"{float(jnp.max(jnp.abs(out - want_out))):.2e} (of "
          f"{float(jnp.max(jnp.abs(want_out))):.2e}), lse "
          f"{float(jnp.max(jnp.abs(lse - want_lse))):.2e}", flush=True)
  nbytes = sum(a.nbytes for a in args[2:])
  ones, bump = jnp.ones((2**28,), jnp.float32), jax.jit(lambda a: a + 1)
  bandwidth = 2 * ones.nbytes / benchmarks.timed_back_to_back(
      lambda: bump(ones), calls=10)["median_s"]
  triton = jax.jit(functools.partial(
      triton_kernel.decode_attention, fmt=FMT, group_size=HEAD_DIM,
      with_logits=False))
  print(f"device: {benchmarks.device_name()}; copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; {nbytes / 1e6:.0f} MB read per call")
  print("| kernel (no logits) | ms | of copy bw |\n|---|---|---|")
  for _ in range(2):
    calls = [("Triton, defaults", triton)] + [
        (f"Mosaic GPU, block {b}, split {s}, {n} stages",
         functools.partial(decode_attention, split=s, stages=n, block=b))
        for b, s, n in configs]
    for name, fn in calls:
      t = benchmarks.timed_back_to_back(lambda: fn(*args))["median_s"]
      print(f"| {name} | {1e3 * t:.3f} | {nbytes / t / bandwidth:.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
