"""What each policy keeps, on hand-made caches, and the errors bad input gets."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lmcache_jax.cache.eviction import in_position_order, pool_1d
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION

CFG = tiny_config(num_layers=2, num_kv_heads=2, num_heads=4)


def cache_of(n, capacity=None, order=None, keys=None):
  """A cache of one sequence holding positions 0..n-1 (in slot ``order``)."""
  capacity = capacity or n + 1
  cache = init_cache(CFG, 1, capacity, jnp.float32)
  slots = np.arange(n) if order is None else np.asarray(order)
  positions = np.full(cache.positions.shape, -1, np.int32)
  positions[..., slots] = np.arange(n)
  cache = cache.replace(positions=jnp.asarray(positions),
                        lengths=jnp.array([n], jnp.int32))
  if keys is not None:
    cache = cache.replace(keys=jnp.asarray(keys, jnp.float32))
  return cache


@functools.partial(jax.jit, static_argnames=("policy",))
def _update(cache, mass, *, policy):
  n = cache.lengths[:1, None] - 1
  step = Step(positions=n, rope_positions=n,
              slots=jnp.zeros((CFG.num_layers, 1, CFG.num_kv_heads, 1), jnp.int32),
              query_weights=jnp.ones((1, 1)))
  return policy.update(cache, mass, step)


def after_update(policy, cache, mass):
  """The cache after the policy sees ``mass`` [L, 1, K, S] for the last token."""
  return _update(cache, jnp.asarray(mass, jnp.float32), policy=policy.bind(CFG))


def kept(cache, layer=0, head=0):
  pos = np.asarray(cache.positions[layer, 0, head])
  return sorted(pos[pos >= 0].tolist())


def mass_on(n, capacity, heavy, layers=CFG.num_layers):
  mass = np.full((layers, 1, CFG.num_kv_heads, capacity), 0.01)
  for position, value in heavy.items():
    mass[..., position] = value
  return mass


def test_sliding_window_keeps_the_newest():
  out = after_update(EVICTION.make("sliding_window", budget=4), cache_of(10),
                     mass_on(10, 11, {0: 5.0}))
  assert kept(out) == [6, 7, 8, 9]


def test_attention_sink_keeps_sinks_and_the_newest():
  out = after_update(EVICTION.make("attention_sink", budget=6), cache_of(12),
                     mass_on(12, 13, {}))
  assert kept(out) == [0, 1, 2, 3, 10, 11]


def test_h2o_keeps_heavy_hitters_and_the_recent_window():
  policy = EVICTION.make("h2o", budget=4)
  assert policy.window == 2
  out = after_update(policy, cache_of(10), mass_on(10, 11, {3: 2.0, 5: 1.0}))
  assert kept(out) == [3, 5, 8, 9]


def test_h2o_accumulates_over_steps():
  policy = EVICTION.make("h2o", budget=4, window=1)
  cache = cache_of(8, capacity=9)
  cache = cache.replace(scores=jnp.asarray(mass_on(8, 9, {2: 3.0}),
                                           jnp.float32))
  out = after_update(policy, cache, mass_on(8, 9, {4: 2.0, 5: 2.5}))
  # 2 has 3.01 accumulated, beating 4 and 5 on this step's mass alone.
  assert kept(out) == [2, 4, 5, 7]


def test_tova_drops_the_least_attended_token_in_every_head():
  mass = np.ones((CFG.num_layers, 1, CFG.num_kv_heads, 7))
  mass[:, :, 0, 2] = 0.0          # head 0 ignores token 2 ...
  mass[:, :, 1, 2] = 1.5          # ... head 1 likes it: mean 0.75 < 1
  out = after_update(EVICTION.make("tova", budget=5), cache_of(6, 7), mass)
  for head in range(CFG.num_kv_heads):
    assert kept(out, head=head) == [0, 1, 3, 4, 5]


def test_knorm_keeps_the_lowest_key_norms():
  keys = np.ones((CFG.num_layers, 1, CFG.num_kv_heads, 9, CFG.head_dim))
  keys[..., [1, 4, 6], :] = 3.0
  out = after_update(EVICTION.make("knorm", budget=5), cache_of(8, 9, keys=keys),
                     mass_on(8, 9, {}))
  assert kept(out) == [0, 2, 3, 5, 7]


def test_random_is_reproducible_and_differs_across_heads():
  policy = EVICTION.make("random", budget=8, seed=5)
  cache = cache_of(40, 41)
  a = after_update(policy, cache, mass_on(40, 41, {}))
  b = after_update(policy, cache, mass_on(40, 41, {}))
  np.testing.assert_array_equal(a.positions, b.positions)
  assert kept(a, head=0) != kept(a, head=1)


def test_snapkv_pools_in_text_order_not_slot_order():
  rng = np.random.default_rng(0)
  n = 12
  order = rng.permutation(n)
  positions = np.full(n + 2, -1)
  positions[order] = np.arange(n)
  votes = np.zeros(n + 2)
  votes[order[5]] = 1.0                     # the token at position 5
  pooled = np.asarray(in_position_order(
      lambda x: pool_1d(x, 3, "max"), jnp.asarray(votes),
      jnp.asarray(positions)))
  by_position = pooled[order]
  np.testing.assert_array_equal(by_position > 0, np.isin(np.arange(n),
                                                         [4, 5, 6]))


def test_snapkv_keeps_the_observed_token_and_its_neighbours():
  policy = EVICTION.make("snapkv", budget=5, window=2, kernel=3, pool="max")
  out = after_update(policy, cache_of(20, 21), mass_on(20, 21, {9: 4.0}))
  assert kept(out) == [8, 9, 10, 18, 19]


def test_pyramidkv_budgets_fall_with_depth_and_average_the_budget():
  policy = EVICTION.make("pyramidkv", budget=128)
  budgets = policy.layer_budgets(30)
  assert np.all(np.diff(budgets) <= 0) and budgets[0] > budgets[-1]
  assert budgets.mean() <= 128 and budgets.min() >= policy.window
  assert budgets[0] == policy.max_row_slots
  assert policy.cache_capacity(4096, 64) == budgets[0] + 64


@pytest.mark.parametrize("inner", ["snapkv(window=1, kernel=1)", "object"])
def test_adakv_gives_concentrated_heads_budget_to_diffuse_ones(inner):
  if inner == "object":   # a policy object, its budget replaced by adakv's
    inner = EVICTION.make("snapkv", budget=99, window=1, kernel=1)
  policy = EVICTION.make("adakv", budget=6, inner=inner)
  n, cap = 20, 21
  mass = np.full((CFG.num_layers, 1, CFG.num_kv_heads, cap), 0.0)
  mass[:, :, 0, 3] = 10.0                     # head 0: one token matters
  mass[:, :, 1, :n] = np.linspace(1.0, 2.0, n)  # head 1: everything matters
  out = after_update(policy, cache_of(n, cap), mass)
  counts = np.asarray(out.live_slots())[0, 0]
  assert counts.sum() == 2 * 6
  floor = int(np.ceil(0.2 * 6))
  assert counts[0] <= max(floor, 2) < counts[1] <= policy.max_row_slots
  assert 3 in kept(out, head=0)


@pytest.mark.parametrize("spec, match", [
    ("sliding_window(budget=0)", "budget must be a positive"),
    ("sliding_window(budget=-4)", "budget must be a positive"),
    ("sliding_window(budget=2.5)", "whole number"),
    ("attention_sink(budget=3)", r"sinks \(4\) \+ window \(0\), with"),
    ("attention_sink(budget=4)", "at least the newest token, exceed"),
    ("knorm(budget=8, evict_every=-1)", "evict_every must be 0"),
    ("knorm(budget=8, evict_every=0.5)", "evict_every must be a whole"),
    ("snapkv(budget=16, window=32)", r"window \(32\)"),
    ("h2o(budget=8, window=9)", r"window \(9\)"),
    ("snapkv(budget=64, kernel=4)", "odd"),
    ("snapkv(budget=64, pool='median')", "pool must be one of"),
    ("pyramidkv(budget=32)", "smaller than the budget"),
    ("adakv(budget=64, inner='nope')", "unknown eviction policy 'nope'"),
    ("adakv(budget=64, inner='pyramidkv')", "per-layer budgets"),
    ("adakv(budget=64, alpha=1.5)", "alpha"),
    ("snapkv(budget=64, windw=8)", "has no parameter.*windw"),
    ("snapkv_typo(budget=64)", "unknown eviction policy.*valid: adakv"),
])
def test_bad_input_is_a_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    EVICTION.make(spec)


def test_a_parameter_given_twice_must_agree():
  assert EVICTION.make("snapkv(budget=64)", budget=64).budget == 64
  assert EVICTION.make("snapkv(budget=64)", budget=None).budget == 64
  with pytest.raises(ValueError, match=r"'snapkv\(budget=64\)' sets budget=64, "
                     r"and budget=128 is also given; give one"):
    EVICTION.make("snapkv(budget=64)", budget=128)


def test_budget_larger_than_the_context_is_an_error():
  with pytest.raises(ValueError, match="larger than the context"):
    EVICTION.make("h2o", budget=512).cache_capacity(300, 64)


def test_every_policy_names_its_paper_and_takes_a_budget():
  for name in EVICTION.names():
    factory = EVICTION.get(name)
    module = inspect.getmodule(factory)
    if name != "full":
      assert "budget" in EVICTION.parameters(name)
      assert len((module.__doc__ or "").split()) > 20, name
