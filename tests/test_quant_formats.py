"""Formats, packing, quantization math and quant plans."""

from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from conftest import tiny_config
from lmcache_jax.numerics import schemes
from lmcache_jax.quant import transform
from lmcache_jax.numerics.formats import FORMATS, format_for_bits, get_format, pack, unpack
from lmcache_jax.quant.plan import QuantPlan

INT_FORMATS = ["int2", "int3", "int4", "int8"]


def test_pack_layout_by_hand():
  # int4, head_dim 32: W = 4 words; channel d -> word d % 4, bits 4 * (d // 4).
  codes = np.zeros(32, np.uint32)
  codes[5] = 0xA       # word 1, chunk 1 -> bits 4..7
  codes[31] = 0x3      # word 3, chunk 7 -> bits 28..31
  words = np.asarray(pack(jnp.asarray(codes), FORMATS["int4"]))
  np.testing.assert_array_equal(words, [0, 0xA0, 0, 0x30000000])
  # int3 = a 2-bit plane (2 words) then a 1-bit plane (1 word).
  codes = np.zeros(32, np.uint32)
  codes[2] = 0b111     # plane 2: word 0, bits 2..3 = 0b11; plane 1: bit 2
  words = np.asarray(pack(jnp.asarray(codes), FORMATS["int3"]))
  np.testing.assert_array_equal(words, [0b1100, 0, 0b100])


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(INT_FORMATS), head_dim=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pack_round_trip_is_exact(name, head_dim, rows, seed):
  fmt = FORMATS[name]
  codes = np.random.default_rng(seed).integers(0, 1 << fmt.bits,
                                               (rows, head_dim)).astype(np.uint32)
  words = pack(jnp.asarray(codes), fmt)
  assert words.shape == (rows, head_dim * fmt.bits // 32)
  np.testing.assert_array_equal(unpack(words, fmt, head_dim), codes)


@pytest.mark.parametrize("name", INT_FORMATS)
def test_int_error_is_at_most_half_a_step(name):
  fmt = FORMATS[name]
  x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 64)) * 3,
                  jnp.float32)
  payload, scale, zero = schemes.quantize(x, fmt, 32)
  y = schemes.dequantize(payload, scale, zero, fmt, 32, 64)
  step = np.repeat(np.asarray(scale, np.float32), 32, axis=-1)
  # half a step, plus float16 rounding of scale/zero over up to 2^b steps
  slack = 0.5 * step + 2e-3 * np.abs(np.asarray(x)) + 1e-3
  assert np.all(np.abs(np.asarray(y) - np.asarray(x)) <= slack)


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("offset", [-50.0, -2.0, 0.0, 2.0, 50.0])
def test_zero_code_grids_hold_every_group(name, offset):
  """The uint8 zero code puts the grid over [min(lo, 0), max(hi, 0)]: groups
  on one side of 0 (offset) still round to within half a step, and the
  code is the share of the grid below 0 in 255ths."""
  fmt = FORMATS[name]
  x = jnp.asarray(np.random.default_rng(4).standard_normal((6, 64)) + offset,
                  jnp.float32)
  payload, scale, zero = schemes.quantize(x, fmt, 32)
  assert zero.dtype == jnp.uint8 and scale.dtype == jnp.float16
  y = schemes.dequantize(payload, scale, zero, fmt, 32, 64)
  step = np.repeat(np.asarray(scale, np.float32), 32, axis=-1)
  slack = 0.5 * step + 2e-3 * np.abs(np.asarray(x)) + 1e-3
  assert np.all(np.abs(np.asarray(y) - np.asarray(x)) <= slack)
  groups = np.asarray(x).reshape(6, 2, 32)
  lo, hi = groups.min(-1), groups.max(-1)
  below, span = -np.minimum(lo, 0), np.maximum(hi, 0) - np.minimum(lo, 0)
  np.testing.assert_allclose(np.asarray(zero), np.round(255 * below / span),
                             atol=1)
  assert np.all(np.asarray(zero)[lo >= 0] == 0)
  assert np.all(np.asarray(zero)[hi <= 0] == 255)
  if abs(offset) == 50:   # every group on one side: the clamp is exercised
    assert np.all((lo >= 0) | (hi <= 0))


@pytest.mark.parametrize("name", INT_FORMATS)
def test_outliers_are_kept_and_leave_the_grid(name):
  """The largest entries of each vector are stored beside the codes: they
  read back to float16 precision and no longer stretch the grid."""
  fmt = FORMATS[name]
  rng = np.random.default_rng(6)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  spikes = np.stack([rng.choice(64, 2, replace=False) for _ in range(8)])
  x[np.arange(8)[:, None], spikes] = 30 * rng.choice([-1, 1], (8, 2))
  dense, index, values = schemes.split_outliers(jnp.asarray(x), 2)
  assert index.dtype == jnp.uint8
  assert np.all(np.sort(np.asarray(index), -1) == np.sort(spikes, -1))
  assert not np.asarray(dense)[np.arange(8)[:, None], spikes].any()
  kept = np.asarray(schemes.fake_quant(jnp.asarray(x), fmt, 32, outliers=2))
  np.testing.assert_allclose(kept[np.arange(8)[:, None], spikes],
                             x[np.arange(8)[:, None], spikes], rtol=1e-3)
  plain = np.asarray(schemes.fake_quant(jnp.asarray(x), fmt, 32))
  rest = np.ones_like(x, bool)
  rest[np.arange(8)[:, None], spikes] = False
  assert (np.abs(kept - x)[rest].mean() < np.abs(plain - x)[rest].mean() / 3)


def test_constant_group_and_fp8():
  x = jnp.full((2, 32), 1.5, jnp.float32)
  for fmt in FORMATS.values():
    np.testing.assert_allclose(schemes.fake_quant(x, fmt, 32), x, rtol=1e-3)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32)),
                  jnp.float32)
  y = schemes.fake_quant(x, FORMATS["fp8"], 16)
  np.testing.assert_allclose(y, x, rtol=0.07, atol=1e-2)


def test_kivi_layout_keeps_recent_tokens_exact():
  rng = np.random.default_rng(3)
  keys = jnp.asarray(rng.standard_normal((2, 50, 32)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((2, 50, 32)), jnp.float32)
  kq, vq = schemes.kivi_fake_quant(keys, values, FORMATS["int2"], 16, 10)
  # 40 tokens outside the window -> 32 quantized (2 whole groups), 18 exact
  np.testing.assert_array_equal(kq[:, 32:], keys[:, 32:])
  np.testing.assert_array_equal(vq[:, 32:], values[:, 32:])
  assert not np.allclose(kq[:, :32], keys[:, :32])
  # keys: per channel over tokens -> a channel scaled by 100 keeps its shape
  scaled = keys.at[..., 0].multiply(100.0)
  kq2, _ = schemes.kivi_fake_quant(scaled, values, FORMATS["int2"], 16, 10)
  np.testing.assert_allclose(kq2[..., 1:], kq[..., 1:], rtol=1e-6)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="unsupported bit width 5"):
    format_for_bits(5)
  with pytest.raises(ValueError, match="unsupported KV format 'int5'"):
    get_format("int5")
  with pytest.raises(ValueError, match="group_size=24 must divide head_dim=64"):
    FORMATS["int4"].check(64, 24)
  with pytest.raises(ValueError, match="multiple of 32"):
    FORMATS["int4"].check(48, 16)
  with pytest.raises(ValueError, match="multiple of 16"):
    FORMATS["int8"].check(64, 8)
  cfg = tiny_config(head_dim=32, hidden_size=64, num_heads=4)
  with pytest.raises(ValueError, match="group_size=24 must divide"):
    QuantPlan.uniform(cfg, "int4", group_size=24)
  with pytest.raises(ValueError, match="copy_bits must be 8 .* or 16"):
    QuantPlan.uniform(cfg, "int4", group_size=32, copy_bits=4)
  with pytest.raises(ValueError, match=r"outliers must be an int in \[0, head_dim=32\)"):
    QuantPlan.uniform(cfg, "int4", group_size=32, outliers=32)
  plan = QuantPlan.uniform(cfg, "int4", group_size=32)
  with pytest.raises(ValueError, match="quant plan has .* but model"):
    plan.check(tiny_config(head_dim=32, hidden_size=64, num_heads=4,
                           num_layers=5))


def test_plan_save_load(tmp_path):
  cfg = tiny_config(head_dim=32, hidden_size=64, num_heads=4)
  formats = (("int4", "int2"), ("fp8", "int8"), ("int3", "int4"))
  scale = np.random.default_rng(0).uniform(0.5, 2, (3, 2, 32)).astype(np.float32)
  plan = QuantPlan(formats, scale, group_size=16, residual=8, sinks=2,
                   policy="kvquant")
  back = QuantPlan.load(plan.save(tmp_path / "plan"), cfg)
  assert not back.rotate and back.key_shift is None
  assert back.copy_bits == 16 and back.outliers == 0
  shifted = plan.replace(rotate=True, key_shift=scale - 1, copy_bits=8,
                         outliers=2)
  again = QuantPlan.load(shifted.save(tmp_path / "shifted"), cfg)
  assert again.rotate and again.copy_bits == 8 and again.outliers == 2
  np.testing.assert_array_equal(again.key_shift, scale - 1)
  assert back.formats == formats and back.policy == "kvquant"
  assert (back.group_size, back.residual, back.sinks) == (16, 8, 2)
  np.testing.assert_array_equal(back.key_scale, scale)
  assert back.average_bits() == pytest.approx(29 / 6)
  with pytest.raises(ValueError, match="no quant plan at"):
    QuantPlan.load(tmp_path / "missing")


def test_hadamard_rotation_is_orthonormal_and_keeps_attention():
  h = transform.hadamard(64)
  np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-6)
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 5, 64)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(transform.rotate(q)) @ np.asarray(
      transform.rotate(k)).T, q @ k.T, rtol=1e-4, atol=1e-4)
  shift, scale = rng.standard_normal(64), rng.random(64) + 0.5
  stored = transform.stored(k, scale, shift, rotated=True)
  np.testing.assert_allclose(transform.restored(stored, scale, shift, True), k,
                             rtol=1e-5, atol=1e-5)


def test_rotation_and_centering_shrink_the_error_of_outlier_keys():
  """Keys with a few large, biased channels (as real keys have) quantize
  far better once centered and rotated."""
  rng = np.random.default_rng(1)
  keys = rng.standard_normal((256, 64)).astype(np.float32)
  keys[:, :3] = keys[:, :3] * 4 + 20
  mean = keys.mean(axis=0)
  fmt = FORMATS["int4"]
  error = lambda rotated, shift: float(np.mean((transform.restored(
      schemes.fake_quant(transform.stored(keys, None, shift, rotated), fmt,
                         64), None, shift, rotated) - keys) ** 2))
  plain, rotated, both = error(False, None), error(True, None), error(True, mean)
  assert both < rotated < plain and both < plain / 4
