"""Calibration policies by name: what they measure and how they allocate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from experiments import setup
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.llama import from_weights
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


def test_allocate_by_hand():
  # two layers, two heads; cost of (2, 3, 4, 8) bits per head
  costs = np.array([[[9, 5, 1, 0], [1, 0.5, 0.2, 0]],
                    [[1, 0.5, 0.2, 0], [9, 5, 1, 0]]], float)
  # budget 3: {2, 4} beats {3, 3} (9.2 + 1... per layer: 1 + 1 = 2 vs 5.5)
  assert calibration.allocate(costs, 3.0) == [[4, 2], [2, 4]]
  assert calibration.allocate(costs, 2.0) == [[2, 2], [2, 2]]
  with pytest.raises(ValueError, match="average at most 1.5"):
    calibration.allocate(costs, 1.5)


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


def test_attention_error_falls_with_bits_and_window():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((2, 40, 32), (40, 32), (40, 32)))
  err = lambda b, r: float(calibration.attention_error(
      q, k, v, jnp.ones(32), fmt=FORMATS[f"int{b}"], group_size=32,
      residual=r))
  assert err(2, 0) > err(4, 0) > err(8, 0) > 0
  assert err(4, 8) < err(4, 0)
  assert err(4, 40) == pytest.approx(0.0, abs=1e-12)


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
  assert len({tuple(sorted(row)) for row in plan.formats}) == 1  # same multiset
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
