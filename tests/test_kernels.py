"""Pallas kernels (interpret mode) against their pure-jnp references."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from experiments.benchmarks._checks import assert_matches_reference
from lmcache_jax.kernels import backend
from lmcache_jax.kernels import decode_attention as da
from lmcache_jax.kernels import dequantize, quantize
from lmcache_jax.numerics import formats, schemes
from lmcache_jax.numerics.formats import FORMATS

pytestmark = pytest.mark.gpu   # python -m pytest -m gpu -n 0, on a GPU
INT_FORMATS = ["int2", "int3", "int4", "int8"]


@pytest.mark.parametrize("name,rows,head_dim,group", [
    ("int2", 13, 64, 32), ("int3", 5, 32, 32), ("int4", 9, 128, 64),
    ("int8", 13, 64, 16)])
def test_quantize_and_dequantize_match_reference(name, rows, head_dim, group):
  fmt = FORMATS[name]
  x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, head_dim))
                  * 2, jnp.float32)
  want = quantize.quantize_pack_reference(x, fmt=fmt, group_size=group)
  got = quantize.quantize_pack(x, fmt=fmt, group_size=group, block_rows=4,
                               interpret=True)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
  dense = dequantize.unpack_dequantize(*got, fmt=fmt, group_size=group,
                                       head_dim=head_dim, block_rows=8,
                                       interpret=True)
  np.testing.assert_array_equal(
      dense, dequantize.unpack_dequantize_reference(
          *want, fmt=fmt, group_size=group, head_dim=head_dim))


def _packed(rng, fmt, shape, group):
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return schemes.quantize(x, fmt, group)


@pytest.mark.parametrize(
    "name,batch,rows,heads,slots,head_dim,group,block,split", [
        ("int4", 2, 3, 3, 75, 64, 32, 16, 32),    # ragged S, G = 3
        ("int4", 1, 2, 4, 40, 128, 128, 16, 32),  # one group: scales folded
        ("int4", 1, 1, 4, 24, 128, 64, 8, 16),    # 16-bit lanes, two groups
        ("int2", 1, 2, 4, 64, 32, 32, 16, 64),
        ("int3", 2, 1, 2, 40, 32, 32, 16, 16),    # two planes: chunk path
        ("int3", 1, 1, 4, 20, 128, 64, 16, 32),   # two planes, Hd 128
        ("int8", 1, 2, 1, 33, 64, 16, 32, 32),
    ])
def test_decode_attention_matches_reference(name, batch, rows, heads, slots,
                                            head_dim, group, block, split):
  fmt = FORMATS[name]
  rng = np.random.default_rng(slots)
  kq = _packed(rng, fmt, (batch, rows, slots, head_dim), group)
  vq = _packed(rng, fmt, (batch, rows, slots, head_dim), group)
  q = jnp.asarray(rng.standard_normal((batch, rows, heads, head_dim)),
                  jnp.float32)
  # ragged: each sequence sees a different prefix; some slots empty
  q_pos = jnp.asarray(rng.integers(slots // 2, slots, batch), jnp.int32)
  slot_pos = np.tile(np.arange(slots, dtype=np.int32), (batch, rows, 1))
  slot_pos[rng.random(slot_pos.shape) < 0.2] = -1
  slot_pos = jnp.asarray(slot_pos)
  want = da.decode_attention_reference(q, q_pos, slot_pos, *kq, *vq, fmt=fmt,
                                       group_size=group)
  got = da.decode_attention(q, q_pos, slot_pos, *kq, *vq, fmt=fmt,
                            group_size=group, block_s=block, split_s=split,
                            interpret=True)
  assert_matches_reference(got, want, rtol=1e-5, atol=1e-5)
  out, lse, none = da.decode_attention(
      q, q_pos, slot_pos, *kq, *vq, fmt=fmt, group_size=group, block_s=block,
      split_s=split, with_logits=False, interpret=True)
  assert none is None
  # the same sums, compiled without the logits store (XLA may order the
  # float32 reductions differently)
  np.testing.assert_allclose(out, got[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(lse, got[1], rtol=0, atol=1e-5)
  # the reference itself: softmax over visible slots of dequantized keys
  keys = schemes.dequantize(*kq, fmt, group, head_dim)
  logits = np.einsum("brgh,brsh->brgs", np.asarray(q), np.asarray(keys)) / np.sqrt(head_dim)
  visible = (np.asarray(slot_pos) >= 0) & (np.asarray(slot_pos) <= np.asarray(q_pos)[:, None, None])
  logits = np.where(visible[:, :, None], logits, -np.inf)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  np.testing.assert_allclose(np.asarray(want[1]), lse, rtol=1e-5)


@pytest.mark.parametrize("name,slots,block,split,first", [
    ("int4", 96, 64, 64, 1),    # 64 does not divide 96: blocks of 32
    ("int8", 48, 16, 32, 3),    # splits of 16 (32 does not divide 48)
    ("int4", 40, 16, 32, 2),    # no block of 16 divides 40: rows taken out
    ("int4", 64, 32, 32, 4)])   # row 1 lies past the pool: its last row
def test_decode_attention_reads_pool_rows_in_place(name, slots, block, split,
                                                   first):
  """Codes in a row pool [B, P, S, ...], the rows read from ``first_row``:
  the reference over those rows (clipped into the pool), with tiles chosen
  to divide the slots."""
  fmt, group, head_dim, pool = FORMATS[name], 32, 64, 5
  rng = np.random.default_rng(slots)
  kq = _packed(rng, fmt, (2, pool, slots, head_dim), group)
  vq = _packed(rng, fmt, (2, pool, slots, head_dim), group)
  q = jnp.asarray(rng.standard_normal((2, 2, 3, head_dim)), jnp.float32)
  q_pos = jnp.asarray([slots - 1, slots // 2], jnp.int32)
  slot_pos = np.tile(np.arange(slots, dtype=np.int32), (2, 2, 1))
  slot_pos[rng.random(slot_pos.shape) < 0.2] = -1
  slot_pos = jnp.asarray(slot_pos)
  got = da.decode_attention(q, q_pos, slot_pos, *kq, *vq, fmt=fmt,
                            group_size=group, block_s=block, split_s=split,
                            interpret=True, first_row=jnp.int32(first))
  rows = np.minimum(first + np.arange(2), pool - 1)
  want = da.decode_attention_reference(
      q, q_pos, slot_pos, *(a[:, rows] for a in kq),
      *(a[:, rows] for a in vq), fmt=fmt, group_size=group)
  assert_matches_reference(got, want, rtol=1e-5, atol=1e-5)
  assert da._divisible_tiling(96, 64, 64) == (32, 32)
  assert da._divisible_tiling(40, 16, 32) is None


@pytest.mark.parametrize("name,group", [("int4", 64), ("int3", 32)])
def test_decode_attention_bfloat16_queries(name, group):
  """The GPU path's dtype: bfloat16 queries and products (several groups per
  head, 3 heads padded into group blocks) agree with the float32 reference
  to bfloat16 precision."""
  fmt = FORMATS[name]
  rng = np.random.default_rng(group)
  kq = _packed(rng, fmt, (1, 2, 48, 128), group)
  vq = _packed(rng, fmt, (1, 2, 48, 128), group)
  q = jnp.asarray(rng.standard_normal((1, 2, 3, 128)), jnp.bfloat16)
  q_pos = jnp.array([40], jnp.int32)
  slot_pos = jnp.tile(jnp.arange(48, dtype=jnp.int32), (1, 2, 1))
  want = da.decode_attention_reference(q, q_pos, slot_pos, *kq, *vq, fmt=fmt,
                                       group_size=group)
  got = da.decode_attention(q, q_pos, slot_pos, *kq, *vq, fmt=fmt,
                            group_size=group, block_s=16, split_s=32,
                            interpret=True)
  assert_matches_reference(got, want, rtol=2e-2, atol=2e-2)


def test_decode_attention_blocks_without_visible_slots():
  """Blocks with no visible slot ahead of visible ones in a program (slots
  evicted or after the query), and programs with none at all: the online
  softmax must drop what those blocks summed."""
  fmt = FORMATS["int4"]
  rng = np.random.default_rng(5)
  kq = _packed(rng, fmt, (1, 2, 128, 64), 64)
  vq = _packed(rng, fmt, (1, 2, 128, 64), 64)
  q = jnp.asarray(rng.standard_normal((1, 2, 4, 64)), jnp.float32)
  slot_pos = np.tile(np.arange(128, dtype=np.int32), (1, 2, 1))
  slot_pos[:, 0, :48] = -1     # row 0: blocks 0-2 of the first program empty
  slot_pos[:, 1, 16:64] = -1   # row 1: a visible block, then three empty
  q_pos = jnp.array([60], jnp.int32)   # the second program sees nothing
  want = da.decode_attention_reference(q, q_pos, jnp.asarray(slot_pos), *kq,
                                       *vq, fmt=fmt, group_size=64)
  got = da.decode_attention(q, q_pos, jnp.asarray(slot_pos), *kq, *vq,
                            fmt=fmt, group_size=64, block_s=16, split_s=64,
                            interpret=True)
  assert_matches_reference(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_with_nothing_visible():
  fmt = FORMATS["int4"]
  rng = np.random.default_rng(0)
  kq = _packed(rng, fmt, (1, 1, 16, 32), 32)
  q = jnp.ones((1, 1, 2, 32), jnp.float32)
  out, lse, logits = da.decode_attention(
      q, jnp.array([3]), jnp.full((1, 1, 16), -1, jnp.int32), *kq, *kq,
      fmt=fmt, group_size=32, block_s=16, interpret=True)
  assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) <= -1e29)
  assert np.all(np.asarray(logits.dense()) <= -1e29)


@pytest.mark.parametrize("name,rows_out", [("int4", 4), ("int3", 4),
                                           ("int4", 0)])   # 0: no logits
def test_kernels_lower_to_triton(name, rows_out):
  """The GPU lowering (Pallas → Triton) is built on the CPU too."""
  fmt = FORMATS[name]
  sds = jax.ShapeDtypeStruct
  check = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  lower = lambda f, *a: export.export(jax.jit(f), platforms=["cuda"],
                                      disabled_checks=check)(*a)
  # group 64 on head dim 128: two blocks of 4 product rows for 3 heads;
  # the words read in the lanes the wrapper uses (16 bits for int4)
  lane = da.lane_bits(fmt, 128)
  width = fmt.words(128) * 32 // lane
  packed = [sds((2, 8, 256, width), jnp.uint16 if lane == 16 else jnp.uint8),
            sds((2, 8, 256, 2), jnp.float16), sds((2, 8, 256, 2), jnp.uint8)]
  exported = lower(da._build(2, 8, 8, 4, 3, rows_out, 256, 128, width,
                             fmt, 64, 64, 128, 4, 2, False),
                   sds((2, 8, 8, 128 * len(fmt.planes)), jnp.bfloat16),
                   sds((2, 1), jnp.int32), sds((2, 8, 256), jnp.int32),
                   *packed, *packed)
  assert "triton" in exported.mlir_module()


def test_formats_without_a_kernel_say_so(caplog):
  """fp8 has no Pallas kernel: the wrappers run the reference and log it,
  even when a kernel was asked for (interpret mode)."""
  backend.note.cache_clear()
  fmt = FORMATS["fp8"]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 8, 32)),
                  jnp.float32)
  kq = schemes.quantize(x, fmt, 32)
  with caplog.at_level(logging.WARNING, "lmcache_jax.kernels"):
    got = da.decode_attention(jnp.ones((1, 1, 2, 32)), jnp.array([7]),
                              jnp.arange(8, dtype=jnp.int32)[None, None], *kq,
                              *kq, fmt=fmt, group_size=32, interpret=True)
    quantize.quantize_pack(x, fmt=fmt, group_size=32, interpret=True)
  want = da.decode_attention_reference(
      jnp.ones((1, 1, 2, 32)), jnp.array([7]),
      jnp.arange(8, dtype=jnp.int32)[None, None], *kq, *kq, fmt=fmt,
      group_size=32)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for op in ("decode_attention", "quantize_pack"):
    assert (f"{op}: no Pallas kernel for format fp8; running the pure-jnp "
            f"reference {op}_reference") in caplog.text


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_lane_tiles_hold_every_code_once_per_plane(name, head_dim):
  """The fused kernel's unpacking alone: per plane, the lane tiles of packed
  words hold base + field / 2**p for the channels ``lane_order`` names, each
  channel exactly once."""
  fmt = FORMATS[name]
  rng = np.random.default_rng(head_dim)
  codes = jnp.asarray(rng.integers(0, 2 ** fmt.bits, (5, head_dim)),
                      jnp.uint32)
  lane = da.lane_bits(fmt, head_dim)
  lanes = da._as_lanes(formats.pack(codes, fmt), lane)
  order = da.lane_order(fmt, head_dim).reshape(len(fmt.planes), head_dim)
  for (bits, first, low), channels in zip(da.planes(fmt, head_dim), order):
    assert sorted(channels) == list(range(head_dim))
    width = head_dim * bits // lane
    raw = lanes[:, first * 8 // lane:][:, :width]
    tiles = jnp.concatenate(da._lane_tiles(raw, bits, ptx=False), axis=1)
    fields = (np.asarray(codes)[:, channels] >> low) & ((1 << bits) - 1)
    step = 1.0 if bits == 8 else 2.0 ** -bits
    np.testing.assert_array_equal(
        np.asarray(tiles, np.float32),
        da.tile_base(bits) + fields * step)
