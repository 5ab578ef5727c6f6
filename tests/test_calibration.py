"""Calibration policies by name: what they measure and how they allocate."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from experiments import setup
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.llama import from_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.engine import calibration
from lmcache_jax.numerics.formats import FORMATS
from lmcache_jax.quant.plan import QuantPlan
from policies.calibration.kvquant import channel_scales
from policies.registry import CALIBRATION

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, tiny_weights(CFG),
                                              jnp.float32))


def test_registered_by_name():
  assert {"uniform", "variance", "sensitivity", "kvquant"} <= set(
      CALIBRATION.names())


def layout_bytes(formats, head_dim=32, slots=64, base=100):
  """The payload's layout rule by hand: per format a pool of one row per
  head stored in it (codes plus a float16 scale and a uint8 zero per slot,
  one group), and per layer an int32 head per row it reads (the most heads a
  layer stores in the format) and its first row."""
  rows = calibration.rows_of(formats)
  most = {f: max(sum(g == f for g in row) for row in formats) for f in rows}
  return base + sum(n * slots * (head_dim * FORMATS[f].bits // 8 + 3)
                    + len(formats) * 4 * (most[f] + 1)
                    for f, n in rows.items())


def test_allocate_by_hand():
  # two layers, two heads; cost of (2, 3, 4, 8) bits per head: layer 0's
  # heads suffer from few bits, layer 1's hardly
  costs = np.array([[[9, 5, 1, 0], [8, 4, 1, 0]],
                    [[0.2, 0.1, 0.1, 0], [0.3, 0.2, 0.1, 0]]], float)
  alloc = lambda b: calibration.allocate(costs, b, nbytes=layout_bytes)
  uniform3 = layout_bytes(calibration.formats_of([[3, 3], [3, 3]]))
  # at 3 bits the first layer takes the bits the second gives up; the
  # mixed plan's extra head maps cost its last bit (11 of 12)
  got = alloc(3.0)
  assert got.bits == [[4, 3], [2, 2]]
  assert got.rows == {2: 2, 3: 1, 4: 1}
  assert got.nbytes <= uniform3 == got.budget_bytes
  assert got.total_bits == 11
  assert alloc(2.0).bits == [[2, 2], [2, 2]]
  assert alloc(4.0).bits == [[4, 4], [3, 4]]
  with pytest.raises(ValueError, match="fits 1.5 average bits; the cheapest, "
                     "all 2-bit, needs kv_bits >= 2"):
    alloc(1.5)
  with pytest.raises(ValueError, match=r"\(2, 5\): each must be one of 2, 3, 4, 8"):
    calibration.allocate(costs[..., :2], 3.0, (2, 5), nbytes=layout_bytes)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2)])
def test_allocate_is_optimal_by_brute_force(shape):
  """Within the bits it admits the allocation is the cheapest of every plan,
  its bytes fit the budget, and one more bit would not: the admitted bits
  are the most whose cheapest plan fits."""
  bits = calibration.BITS
  picks = np.array(list(itertools.product(range(len(bits)),
                                          repeat=int(np.prod(shape)))))
  picks = picks.reshape(-1, *shape)
  plan_bits = np.take(bits, picks).sum(axis=(1, 2))
  rng = np.random.default_rng(sum(shape))
  for trial in range(4):
    base = rng.lognormal(0, 2, shape)[..., None]
    costs = base * rng.random((*shape, 4))
    if trial % 2 == 0:  # errors that fall with bits, each head on its own scale
      costs = np.sort(costs, axis=-1)[..., ::-1]
    plan_costs = np.take_along_axis(costs[None], picks[..., None],
                                    -1).sum(axis=(1, 2, 3))
    for budget in (2, 2.5, 3, 3.4, 4, 5, 6.5):
      got = calibration.allocate(costs, budget, nbytes=layout_bytes)
      assert got.nbytes == layout_bytes(got.formats) <= got.budget_bytes
      best = plan_costs[plan_bits <= got.total_bits].min()
      assert got.cost == pytest.approx(best, rel=1e-12)
      more, _ = calibration.cheapest_bits(costs, bits, got.total_bits + 1)
      assert (more.sum() <= got.total_bits or layout_bytes(
          calibration.formats_of(more)) > got.budget_bytes)


def test_the_budget_is_the_uniform_plans_bytes():
  uniform = {b: 1000 * b for b in calibration.BITS}
  for b in calibration.BITS:
    assert calibration.budget_bytes(uniform, b) == uniform[b]
  # linear in between: 3.5 bits is half way from 3 to 4
  assert calibration.budget_bytes(uniform, 3.5) == 3500


@pytest.mark.parametrize("copy_bits,outliers", [(16, 0), (8, 1)])
def test_allocated_bytes_are_the_caches(copy_bits, outliers):
  """The allocator's byte count is what init_cache really allocates for its
  plan, head maps included, and within the budget; layers differ."""
  template = QuantPlan.uniform(CFG, "int4", group_size=32, residual=4,
                               sinks=2, copy_bits=copy_bits, outliers=outliers,
                               rotate=True, key_shift=np.ones((3, 3, 32)))
  nbytes = calibration.cache_bytes(CFG, template, capacity=64)
  costs = np.sort(np.random.default_rng(4).lognormal(0, 2, (3, 3, 4)),
                  axis=-1)[..., ::-1]
  varied = False
  for budget in (2, 3, 3.5, 5, 8):
    got = calibration.allocate(costs, budget, nbytes=nbytes)
    plan = template.replace(formats=got.formats)
    cache = init_cache(CFG, 1, 64, jnp.bfloat16, quant=plan)
    assert got.nbytes == cache.payload_nbytes <= got.budget_bytes
    rows = {part.fmt.bits: part.data.shape[1] for part in cache.keys.parts}
    assert rows == got.rows
    varied |= len({tuple(sorted(row)) for row in got.bits}) > 1
  assert varied


def test_collect_matches_the_cache(lm):
  from lmcache_jax.cache.kv_cache import init_cache
  from lmcache_jax.cache.policy import KeepAll
  from lmcache_jax.engine.prefill import prefill
  tokens = list(np.random.default_rng(0).integers(0, 97, 24))
  acts = calibration.collect(lm, tokens)
  _, cache = prefill(lm, init_cache(CFG, 1, 24, jnp.float32), [tokens],
                     KeepAll())
  np.testing.assert_allclose(acts.keys_rope, np.asarray(cache.keys[:, 0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts.values, np.asarray(cache.values[:, 0]),
                             rtol=1e-5, atol=1e-5)
  assert acts.queries.shape == (3, 6, 24, 32)
  # pre-RoPE keys of position 0 equal the rotated ones (angle 0)
  np.testing.assert_allclose(acts.keys[:, :, 0], acts.keys_rope[:, :, 0],
                             rtol=1e-5, atol=1e-6)


def test_channel_scales_tie_rope_pairs():
  keys = np.random.default_rng(2).standard_normal((1, 1, 50, 8)) * np.array(
      [1, 10, 1, 1, 1, 1, 1, 3])
  scale = channel_scales(keys, 0.99)[0, 0]
  np.testing.assert_allclose(scale[:4], scale[4:])
  assert scale[1] > 5 * scale[0] and scale.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("name,bits", [("uniform", 4), ("variance", 3.4),
                                       ("sensitivity", 3.4), ("kvquant", 3)])
def test_from_config_calibrates_and_saves(lm, tmp_path, name, bits):
  tokens = np.random.default_rng(3).integers(0, 97, 48)
  path = tmp_path / "plan"
  plan = setup.quant_plan({"kv_bits": bits, "calibration": name,
                            "group_size": 32, "residual": 4,
                            "save_plan": str(path)}, lm, tokens)
  plan.check(CFG)
  assert plan.average_bits() <= bits and plan.policy == name
  # bytes (head maps included) within those of `bits` average bits
  nbytes = calibration.cache_bytes(CFG, plan)
  uniform = {b: nbytes(calibration.formats_of([[b] * 3] * 3))
             for b in calibration.BITS}
  assert nbytes(plan.formats) <= calibration.budget_bytes(uniform, bits)
  if name == "kvquant":   # 1% of 32 channels, at least one, kept exact
    assert plan.sinks == 4 and not np.all(plan.key_scale == 1)
    assert plan.outliers == 1
  # rotated and centered on the calibration text by default
  assert plan.rotate
  np.testing.assert_allclose(plan.key_shift, calibration.key_means(
      calibration.collect(lm, tokens)), rtol=1e-6)
  loaded = setup.quant_plan({"plan": str(path)}, lm)
  assert loaded.formats == plan.formats and loaded.rotate
  assert loaded.outliers == plan.outliers
  np.testing.assert_array_equal(loaded.key_scale, plan.key_scale)
  np.testing.assert_array_equal(loaded.key_shift, plan.key_shift)


def test_kvquant_outlier_count():
  from policies.calibration.kvquant import KVQuant
  assert KVQuant().outliers(64) == 1 and KVQuant().outliers(256) == 3
  assert KVQuant(outlier_fraction=0).outliers(64) == 0
  with pytest.raises(ValueError, match="outlier_fraction must be in"):
    KVQuant(outlier_fraction=1.5).outliers(64)


def test_bad_calibration_input(lm):
  assert setup.quant_plan({"kv_bits": 16}, lm) is None
  plain = {"center_keys": False, "group_size": 32}
  with pytest.raises(ValueError, match="whole bits"):
    setup.quant_plan({"kv_bits": 2.5, "calibration": "uniform", **plain}, lm)
  with pytest.raises(ValueError, match="no tokenizer to read calibration"):
    setup.quant_plan({"kv_bits": 4, "group_size": 32}, lm)  # centering reads text
  with pytest.raises(ValueError, match="unknown calibration policy 'nope'"):
    setup.quant_plan({"kv_bits": 4, "calibration": "nope"}, lm)
  with pytest.raises(ValueError, match="unsupported bit width 5"):
    setup.quant_plan({"kv_bits": 5, **plain}, lm)
  with pytest.raises(ValueError, match="power-of-two head_dim, got 48"):
    QuantPlan.uniform(tiny_config(head_dim=48, hidden_size=96, num_heads=2,
                                  num_kv_heads=2), "int8", group_size=16,
                      rotate=True)
  other = QuantPlan.uniform(tiny_config(head_dim=32, hidden_size=64,
                                        num_heads=4, num_kv_heads=4), "int4",
                            group_size=32)
  with pytest.raises(ValueError, match="does not fit|but model"):
    other.check(CFG)
