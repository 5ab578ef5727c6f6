"""The packed cache inside the model: writes, slot reuse, fused decode, bytes."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.kernels import backend
from lmcache_jax.kernels import decode_attention as da
from lmcache_jax.kernels.backend import interpret_mode
from lmcache_jax import attention
from lmcache_jax.attention.slots import dense_attend
from lmcache_jax.models.llama import from_weights
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.numerics import schemes
from lmcache_jax.quant import transform
from lmcache_jax.numerics.formats import FORMATS
from lmcache_jax.quant.plan import QuantPlan

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
MIXED = (("int4", "int8", "int4"), ("int8", "int4", "int4"),
         ("int2", "int4", "int4"))


# calibrated key channel means stand-in: a large offset on a few channels
SHIFT = np.zeros((3, 3, 32), np.float32)
SHIFT[:, :, :4] = np.random.default_rng(9).standard_normal((3, 3, 4)) * 5


def plan(formats=None, centered=False, **kw):
  shift = SHIFT if centered else None
  if formats is None:
    return QuantPlan.uniform(CFG, "int8", group_size=32, key_shift=shift,
                             **kw)
  return QuantPlan(formats, np.ones((3, 3, 32), np.float32), 32,
                   kw.get("residual", 0), kw.get("sinks", 0), "",
                   kw.get("rotate", False), shift, kw.get("copy_bits", 16),
                   kw.get("outliers", 0))


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, tiny_weights(CFG),
                                              jnp.float32))


def layer_of(cache, l):
  return attention.layer_of(attention.LayerKV(
      cache.keys, cache.values, cache.positions, cache.scores), jnp.int32(l))


def write(layer, rng, positions, slot_ids):
  batch, steps_ = positions.shape
  k = jnp.asarray(rng.standard_normal((batch, steps_, 3, 32)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, steps_, 3, 32)), jnp.float32)
  slot_ids = jnp.broadcast_to(jnp.asarray(slot_ids)[:, None, :], (batch, 3, steps_))
  return _write(layer, k, v, jnp.asarray(positions), slot_ids), k, v


_write = jax.jit(attention.write_slots)
_dequantize = jax.jit(qpayload.dequantize, static_argnames=("dtype", "exact"))


@pytest.mark.parametrize("formats,residual,sinks,transformed,copy_bits,outliers", [
    (None, 0, 0, False, 16, 0), (MIXED, 4, 2, False, 16, 0),
    (MIXED, 2, 1, True, 16, 0), (MIXED, 4, 2, True, 8, 0),
    (MIXED, 0, 0, True, 16, 2)])
def test_written_slots_dequantize_to_the_tokens(formats, residual, sinks,
                                                transformed, copy_bits,
                                                outliers):
  """Codes hold (k - shift)H quantized; reads undo the shift and rotation;
  sink and recent tokens read as their copies (int8 codes of k itself with
  ``copy_bits`` 8)."""
  rng = np.random.default_rng(0)
  cache = init_cache(CFG, 2, 16, jnp.float32, quant=plan(
      formats, transformed, residual=residual, sinks=sinks,
      rotate=transformed, copy_bits=copy_bits, outliers=outliers))
  layer = layer_of(cache, 1)
  pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]], np.int32)
  layer, k, v = write(layer, rng, pos, np.where(pos >= 0, pos, 16))
  keys = _dequantize(layer.keys, jnp.float32)
  fmt_of = (formats or (("int8",) * 3,) * 3)[1]
  hadamard = jnp.asarray(transform.hadamard(32))
  rotate = lambda x, h: jnp.matmul(x, h, precision=jax.lax.Precision.HIGHEST)

  def stored_round_trip(x, fmt, shift, outliers=0):
    """x stored as (x - shift)H, quantized, and read back."""
    codes = schemes.fake_quant(rotate(x - shift, hadamard), fmt, 32, outliers)
    return rotate(codes, hadamard.T) + shift

  for h in range(3):
    if transformed:
      want = stored_round_trip(k[:, :, h], FORMATS[fmt_of[h]], SHIFT[1, h],
                               outliers)
    else:
      want = schemes.fake_quant(k[:, :, h], FORMATS[fmt_of[h]], 32)
    exact = (pos < sinks) | (pos > pos.max(1, keepdims=True) - residual)
    copy = k[:, :, h]
    if copy_bits == 8:   # int8 codes of the stored vector
      copy = stored_round_trip(copy, FORMATS["int8"], SHIFT[1, h])
    want = jnp.where(jnp.asarray(exact)[..., None], copy, want)
    for b in range(2):
      n = int((pos[b] >= 0).sum())
      np.testing.assert_allclose(keys[b, h, :n], want[b, :n], rtol=1e-5, atol=1e-5)
      # unwritten slots read as a zero stored vector: the channel mean
      np.testing.assert_allclose(keys[b, h, n:], np.broadcast_to(
          SHIFT[1, h] if transformed else 0.0, keys[b, h, n:].shape),
                                 atol=1e-6)


def test_reused_slot_holds_the_new_token_only():
  """An evicted slot rewritten by a later token: codes, scales and exact
  copies all describe the new token."""
  rng = np.random.default_rng(1)
  cache = init_cache(CFG, 1, 8, jnp.float32, quant=plan(MIXED, residual=2, sinks=1))
  layer = layer_of(cache, 0)
  layer, _, _ = write(layer, rng, np.arange(6, dtype=np.int32)[None],
                      np.arange(6)[None])
  # evict slot 0 (a sink, exact) and slot 5 (recent, exact), then reuse them
  layer = layer._replace(positions=layer.positions.at[:, :, jnp.array([0, 5])].set(-1))
  layer, k, _ = write(layer, rng, np.array([[6, 7]], np.int32), np.array([[5, 0]]))
  keys = _dequantize(layer.keys, jnp.float32)
  # token 7 (slot 0) and token 6 (slot 5) are the two latest: exact copies
  np.testing.assert_allclose(keys[0, :, 5], k[0, 0], rtol=1e-6)
  np.testing.assert_allclose(keys[0, :, 0], k[0, 1], rtol=1e-6)
  mirrored = np.asarray(layer.keys.exact_slots[0])
  for h in range(3):
    assert sorted(mirrored[h][mirrored[h] >= 0]) == [0, 5]   # no stale copies
  # without the exact copies the codes alone are the new tokens, quantized
  packed = _dequantize(layer.keys, jnp.float32, exact=False)
  for h, name in enumerate(MIXED[0]):
    np.testing.assert_allclose(
        packed[0, h, 0], schemes.fake_quant(k[0, 1, h], FORMATS[name], 32),
        rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("formats,residual,sinks,transformed,copy_bits,outliers", [
    (None, 0, 0, False, 16, 0), (MIXED, 3, 1, False, 16, 0),
    (MIXED, 3, 1, True, 16, 0), (None, 0, 0, True, 16, 0),
    (MIXED, 3, 1, True, 8, 0), (MIXED, 3, 1, True, 16, 1)])
def test_fused_decode_equals_dequantized_attention(formats, residual, sinks,
                                                   transformed, copy_bits,
                                                   outliers):
  """The kernel reads stored (centered, rotated) codes; its result equals
  dense attention over the dequantized cache (with outliers, decode reads
  the dequantized layer itself)."""
  rng = np.random.default_rng(2)
  cache = init_cache(CFG, 2, 24, jnp.float32, quant=plan(
      formats, transformed, residual=residual, sinks=sinks,
      rotate=transformed, copy_bits=copy_bits, outliers=outliers))
  layer = layer_of(cache, 2)
  pos = np.array([np.arange(10), np.r_[np.arange(7), [-1] * 3]], np.int32)
  layer, _, _ = write(layer, rng, pos, np.where(pos >= 0, pos, 24))
  layer = layer._replace(positions=layer.positions.at[0, :, 4].set(-1))  # evicted
  q = jnp.asarray(rng.standard_normal((2, 1, 6, 32)), jnp.float32)
  qpos = jnp.array([[9], [6]], jnp.int32)
  weights = jnp.array([[1.0], [0.5]])
  keys = _dequantize(layer.keys, jnp.float32)
  values = _dequantize(layer.values, jnp.float32)
  want = dense_attend(q, keys, values, layer.positions, qpos, weights)
  with interpret_mode():
    got = jax.jit(attention.attend_slots)(q, layer, qpos, weights)
    # without the mass the kernel writes no logits; the output is the same
    out_only, no_mass = jax.jit(attention.attend_slots, static_argnums=4)(
        q, layer, qpos, weights, False)
  # atol: the kernel's tiles carry 1 + code / 2**p, and the surplus leaves
  # once per row (a float32 subtraction of about the products' size)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]),
                             rtol=1e-5, atol=3e-6)
  # the mass reads logits rounded to float16 offsets below their block's
  # max: a slot Δ below its head's max carries p ≤ e**-Δ with a relative
  # error ≤ 2**-11 · Δ, so each head adds at most 2**-11 / e
  heads_per_kv = q.shape[2] // layer.keys.num_kv_heads
  np.testing.assert_allclose(
      np.asarray(got[1]), np.asarray(want[1]), rtol=0,
      atol=heads_per_kv * da.LOGIT_OFFSET_PRECISION / np.e + 3e-6)
  assert no_mass is None
  np.testing.assert_allclose(np.asarray(out_only), np.asarray(got[0]),
                             rtol=1e-6, atol=1e-7)
  # the total: Σ p·Δ is the entropy of p less log Z ≤ log(slots)
  np.testing.assert_allclose(np.asarray(got[1]).sum(-1), [[2, 2, 2], [1, 1, 1]],
                             rtol=da.LOGIT_OFFSET_PRECISION * np.log(24) + 1e-5)


def test_int8_model_decode_tracks_full_precision(lm):
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (12, 7)]
  results = []
  for quant in (None, plan(MIXED, residual=4, sinks=1), plan()):
    cache = init_cache(CFG, 2, 24, jnp.float32, quant=quant)
    last, cache = prefill(lm, cache, prompts, KeepAll(), chunk=5)
    logits = [last]
    for token in (5,):
      _, step_logits, cache = steps.decode_step(
          lm.graphdef, lm.params, cache, jnp.array([token, token]),
          jnp.ones(2, bool), jax.random.key(0), policy=KeepAll(),
          sampling=Sampling())
      logits.append(step_logits)
    results.append((np.stack(logits), cache))
  dense, mixed, int8 = results
  np.testing.assert_allclose(int8[0], dense[0], atol=0.05)
  assert np.abs(mixed[0] - dense[0]).max() > np.abs(int8[0] - dense[0]).max()
  np.testing.assert_array_equal(int8[1].positions, dense[1].positions)


def test_bytes_count_codes_scales_and_exact_copies():
  cache = init_cache(CFG, 2, 64, jnp.bfloat16, quant=plan(MIXED, residual=8, sinks=2))
  L, B, K, S, Hd = 3, 2, 3, 64, 32
  # pools of one row per (layer, head): int2 1 row, int4 6, int8 2; a layer
  # reads up to 1, 2 and 1 of them (its head maps) from its first rows
  codes = sum(rows * S * Hd * bits // 8 for bits, rows in ((2, 1), (4, 6), (8, 2)))
  scales = 9 * S * (2 + 1) * (Hd // 32)           # f16 scale + u8 zero per row
  heads = L * B * (1 + 2 + 1) * 4                 # int32 per (layer, sequence, row)
  first = 3 * L * 4                               # int32 per (part, layer)
  exact = K * 10 * Hd * 2 + K * 10 * 4            # copies (bf16) + slot map
  per_lb = 2 * exact + K * Hd * 4                 # + key channel scales (f32)
  fixed = 2 * (B * (codes + scales) + heads + first)   # keys and values
  assert cache.payload_nbytes == L * B * per_lb + fixed
  # int8 copies: one byte per channel plus an f16 scale and u8 zero per group
  int8_copies = init_cache(CFG, 2, 64, jnp.bfloat16, quant=plan(
      MIXED, residual=8, sinks=2, copy_bits=8))
  per_lb += 2 * (K * 10 * (Hd + 3 * (Hd // 32)) - K * 10 * Hd * 2)
  assert int8_copies.payload_nbytes == L * B * per_lb + fixed
  # two outliers per vector: a uint8 channel and a float16 delta each
  with_outliers = init_cache(CFG, 2, 64, jnp.bfloat16, quant=plan(
      MIXED, residual=8, sinks=2, copy_bits=8, outliers=2))
  fixed += 2 * B * 9 * S * 2 * 3
  assert with_outliers.payload_nbytes == L * B * per_lb + fixed
  dense = init_cache(CFG, 2, 64, jnp.bfloat16)
  assert dense.payload_nbytes == 2 * L * B * K * S * Hd * 2


def test_decode_with_outliers_names_its_fallback(caplog):
  """The fused kernel reads codes only: a plan with outliers decodes from
  the dequantized layer, and says so in the log."""
  backend.note.cache_clear()
  rng = np.random.default_rng(7)
  cache = init_cache(CFG, 1, 8, jnp.float32, quant=plan(MIXED, outliers=1))
  layer, _, _ = write(layer_of(cache, 0), rng, np.arange(5, dtype=np.int32)[None],
                      np.arange(5)[None])
  q = jnp.asarray(rng.standard_normal((1, 1, 6, 32)), jnp.float32)
  with caplog.at_level(logging.WARNING, logger="lmcache_jax.kernels"):
    out, _ = attention.attend_slots(q, layer, jnp.array([[4]]), jnp.ones((1, 1)))
  assert "plans with outliers decode from the dequantized layer" in caplog.text
  assert np.all(np.isfinite(np.asarray(out)))
