"""The eviction mechanism's invariants, for every policy, on simulated steps.

A simulated step does what the model does to the cache (write the new tokens'
positions and keys into the planned slots, reset their scores, advance the
lengths) and hands the policy random attention mass, so hypothesis can explore
budgets, chunk sizes and ragged batches without running a model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import tiny_config
from lmcache_jax.arch.rope import inverse_frequencies
from lmcache_jax.cache import positions as pos_lib
from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import init_cache
from policies.registry import EVICTION

CFG = tiny_config(num_layers=3)

# name -> parameters that fit small budgets (one table drives every test).
POLICIES = {
    "sliding_window": {},
    "attention_sink": {"sinks": 2},
    "h2o": {},
    "tova": {},
    "snapkv": {"window": 2, "kernel": 3},
    "pyramidkv": {"window": 2, "kernel": 3},
    "adakv": {"inner": "snapkv(window=2, kernel=3)"},
    "knorm": {},
    "random": {"seed": 3},
}
BUDGETS = (4, 7)
CHUNKS = (1, 3)
BATCH = 2


@functools.cache
def make(name: str, budget: int) -> EvictionPolicy:
  return EVICTION.make(name, budget=budget, **POLICIES[name]).bind(CFG)


@functools.partial(jax.jit, static_argnames=("policy", "num_tokens"))
def simulated_step(cache, num_new, new_keys, mass, *, policy, num_tokens):
  """Plan, write the tokens as the model would, then update with ``mass``."""
  step = policy.plan(cache, num_new, num_tokens)
  layers, batch, heads, _ = cache.positions.shape
  index = (jnp.arange(layers)[:, None, None, None],
           jnp.arange(batch)[None, :, None, None],
           jnp.arange(heads)[None, None, :, None], step.slots)
  new_pos = jnp.broadcast_to(step.positions[None, :, None, :], step.slots.shape)
  written = cache.replace(
      keys=cache.keys.at[index].set(new_keys, mode="drop"),
      positions=cache.positions.at[index].set(new_pos, mode="drop"),
      scores=cache.scores.at[index].set(0.0, mode="drop"),
      lengths=cache.lengths + num_new)
  mass = mass * (written.positions >= 0)
  return step, written, policy.update(written, mass, step)


def row_budgets(policy, num_layers):
  return np.asarray(policy.layer_budgets(num_layers))


def check_invariants(policy, before, step, written, after, num_new):
  pos = np.asarray(after.positions)
  lengths = np.asarray(after.lengths)
  live = pos >= 0
  layers, batch, heads, _ = pos.shape
  # New tokens went only into slots that were free.
  slots = np.asarray(step.slots)
  old = np.asarray(before.positions)
  for l, b, h in np.ndindex(layers, batch, heads):
    real = slots[l, b, h, :num_new[b]]
    assert np.all(old[l, b, h, real] < 0), "a live slot was overwritten"
    assert len(set(real.tolist())) == len(real)
  # Budgets.
  counts = live.sum(-1)
  if policy.name == "adakv":
    assert np.all(counts.sum(-1) <= heads * policy.budget)
    assert np.all(counts <= policy.max_row_slots)
  else:
    assert np.all(counts <= row_budgets(policy, layers)[:, None, None])
  # Rows that held more than their budget are cut to exactly the budget.
  written_counts = (np.asarray(written.positions) >= 0).sum(-1)
  if policy.name != "adakv":
    want = np.minimum(written_counts, row_budgets(policy, layers)[:, None, None])
    np.testing.assert_array_equal(counts, want)
  # Positions: unique, in range; protected tokens (the newest always among
  # them) all still live.
  for l, b, h in np.ndindex(layers, batch, heads):
    kept = pos[l, b, h][live[l, b, h]]
    assert len(np.unique(kept)) == len(kept)
    assert np.all(kept < lengths[b])
    protected = set(range(min(policy.sinks, lengths[b])))
    recent = max(policy.window, 1)
    protected |= set(range(max(lengths[b] - recent, 0), lengths[b]))
    assert protected <= set(kept.tolist()), (protected, kept)
  # Sequences that took no token are untouched.
  for b in np.flatnonzero(np.asarray(num_new) == 0):
    np.testing.assert_array_equal(pos[:, b], old[:, b])
    np.testing.assert_array_equal(np.asarray(after.scores)[:, b],
                                  np.asarray(before.scores)[:, b])


def stream(policy, chunk, schedule, seed):
  """Runs the schedule of per-step token counts; yields each step's arrays."""
  capacity = policy.cache_capacity(10_000, chunk)
  cache = init_cache(CFG, BATCH, capacity, jnp.float32)
  rng = np.random.default_rng(seed)
  for num_new in schedule:
    num_new = np.asarray(num_new, np.int32)
    new_keys = rng.standard_normal(
        (CFG.num_layers, BATCH, CFG.num_kv_heads, chunk, CFG.head_dim))
    mass = rng.random(cache.scores.shape)
    step, written, after = simulated_step(
        cache, jnp.asarray(num_new), jnp.asarray(new_keys, jnp.float32),
        jnp.asarray(mass, jnp.float32), policy=policy, num_tokens=chunk)
    yield cache, step, written, after, num_new
    cache = after


def schedules(chunk):
  """Per-step token counts of a ragged batch (0 = the sequence sits idle)."""
  counts = st.integers(0, chunk)
  return st.lists(st.lists(counts, min_size=BATCH, max_size=BATCH),
                  min_size=1, max_size=9)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_invariants_hold_on_every_step(name, data):
  budget = data.draw(st.sampled_from(BUDGETS))
  chunk = data.draw(st.sampled_from(CHUNKS))
  schedule = data.draw(schedules(chunk))
  policy = make(name, budget)
  for before, step, written, after, num_new in stream(policy, chunk, schedule,
                                                      seed=len(schedule)):
    check_invariants(policy, before, step, written, after, num_new)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_same_result(name):
  policy = make(name, 4)
  schedule = [[3, 1], [2, 3], [3, 3], [1, 0], [3, 2]]
  runs = [list(stream(policy, 3, schedule, seed=7))[-1][3] for _ in range(2)]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_seed_changes_the_choice():
  schedule = [[3, 2]] * 6
  kept = []
  for seed in (1, 2):
    policy = EVICTION.make("random", budget=4, seed=seed)
    kept.append(np.asarray(list(stream(policy, 3, schedule, 0))[-1][3].positions))
  assert not np.array_equal(kept[0], kept[1])


def test_deferred_prefill_scores_without_evicting_then_compresses():
  policy = make("snapkv", 4)
  cache = init_cache(CFG, BATCH, 12, jnp.float32)
  rng = np.random.default_rng(0)
  for _ in range(3):
    _, _, cache = simulated_step(
        cache, jnp.array([3, 3]),
        jnp.asarray(rng.standard_normal(cache.keys.shape[:3] + (3, 8)),
                    jnp.float32),
        jnp.asarray(rng.random(cache.scores.shape), jnp.float32),
        policy=policy.deferring(), num_tokens=3)
  assert np.all(np.asarray(cache.live_slots()) == 9)
  compressed = policy.after_prefill(cache)
  assert np.all(np.asarray(compressed.live_slots()) == 4)


def test_reposition_needs_the_models_rope():
  policy = EVICTION.make("attention_sink", budget=4, sinks=2)
  with pytest.raises(ValueError, match="bind"):
    list(stream(policy, 1, [[1, 1]] * 6, 0))


def test_reposition_is_refused_for_a_policy_that_may_move_other_keys():
  """Re-assignment rotates only the sinks, exact only when nothing older than
  an evicted token is kept but the sinks (a policy evicting oldest first)."""
  class ScoredAndRepositioned(EvictionPolicy):
    name = "scored"
    reposition = True

  with pytest.raises(ValueError, match="only_sinks_move"):
    dataclasses.dataclass(frozen=True)(ScoredAndRepositioned)(budget=4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_capacity_is_budget_plus_a_chunk_or_the_tokens_between_evictions(name):
  policy = make(name, 7)
  assert policy.cache_capacity(10_000, 16) == policy.max_row_slots + 16
  assert policy.cache_capacity(12, 16) == 12
  keep_all = EVICTION.make(name, budget=7, evict_every=0, **POLICIES[name])
  assert keep_all.cache_capacity(10_000, 16, 100) == policy.max_row_slots + 100
  assert keep_all.cache_capacity(10_000, 16, 5) == policy.max_row_slots + 16
  every = EVICTION.make(name, budget=7, evict_every=40, **POLICIES[name])
  assert every.cache_capacity(10_000, 16, 100) == policy.max_row_slots + 40
  hold = EVICTION.make(name, budget=7, evict_every=1, **POLICIES[name])
  assert hold.cache_capacity(10_000, 16, 100) == policy.max_row_slots + 16


def decode_live_counts(policy, prompt, steps, capacity):
  """Live slots per step [steps, L, B, K] when one token at a time follows a
  ``prompt``-token deferred prefill, under ``policy.decoding()``."""
  cache = init_cache(CFG, BATCH, capacity, jnp.float32)
  rng = np.random.default_rng(0)

  def feed(cache, policy, n):
    keys = rng.standard_normal(cache.keys.shape[:3] + (n, CFG.head_dim))
    return simulated_step(cache, jnp.full(BATCH, n, jnp.int32),
                          jnp.asarray(keys, jnp.float32),
                          jnp.asarray(rng.random(cache.scores.shape),
                                      jnp.float32),
                          policy=policy, num_tokens=n)[2]

  cache = policy.after_prefill(feed(cache, policy.deferring(), prompt))
  decoding = policy.decoding()
  counts = []
  for _ in range(steps):
    cache = feed(cache, decoding, 1)
    newest = np.asarray(cache.positions) == np.asarray(cache.lengths - 1)[
        None, :, None, None]
    assert np.all(newest.any(-1)), "the token just written was evicted"
    counts.append(np.asarray(cache.live_slots()))
  return np.stack(counts)


@pytest.mark.parametrize("name", ["knorm", "random", "snapkv", "tova"])
def test_decode_eviction_modes(name):
  """0: nothing evicted until a row is full, then back to the budget;
  1: the budget after every step; N: back to the budget every N steps."""
  budget, prompt, steps = 7, 12, 14
  mode = lambda every: EVICTION.make(name, budget=budget, evict_every=every,
                                     **POLICIES[name]).bind(CFG)
  capacity, live, want = budget + 10, budget, []
  for _ in range(steps):
    live = budget if live + 1 == capacity else live + 1
    want.append(live)
  never = decode_live_counts(mode(0), prompt, steps, capacity)
  np.testing.assert_array_equal(never, np.broadcast_to(
      np.asarray(want)[:, None, None, None], never.shape))
  every = decode_live_counts(mode(1), prompt, steps, capacity=prompt + 1)
  assert np.all(every == budget)
  five = decode_live_counts(mode(5), prompt, steps, capacity=prompt + 5)
  want = budget + (np.arange(steps) + 1) % 5
  np.testing.assert_array_equal(five, np.broadcast_to(
      want[:, None, None, None], five.shape))


def test_a_decoding_policy_never_defers():
  policy = make("snapkv", 4).decoding()
  assert policy.deferring() is policy
  cache = init_cache(CFG, BATCH, 8, jnp.float32)
  assert policy.after_prefill(cache) is cache
  assert policy.decoding() == policy


# In bfloat16 the kept keys are rounded once after the rotation: to within
# one ulp (2^-7 relative) of rounding the float32 rotation computed here.
ROTATION_RTOL = {"float32": 1e-6, "bfloat16": 2.0 ** -7}


@pytest.mark.parametrize("dtype", sorted(ROTATION_RTOL))
@pytest.mark.parametrize("spec", ["attention_sink(sinks=2)",
                                  "adakv(inner='attention_sink(sinks=2)')"])
def test_streaming_rotates_only_its_sinks_and_equals_rotating_every_key(
    spec, dtype):
  """attention_sink, alone or under adakv, re-rotates just the slots that
  move (its sinks); the result equals rotating every kept key by its shift."""
  policy = EVICTION.make(spec, budget=6).bind(CFG)
  rng = np.random.default_rng(3)
  cache = init_cache(CFG, BATCH, 16, dtype)
  positions = np.stack([rng.permutation(16) for _ in range(
      CFG.num_layers * BATCH * CFG.num_kv_heads)]).reshape(cache.positions.shape)
  cache = cache.replace(
      keys=jnp.asarray(rng.standard_normal(cache.keys.shape), dtype),
      positions=jnp.asarray(positions, jnp.int32),
      lengths=jnp.full((BATCH,), 16, jnp.int32))
  after = policy.evict(cache)
  assert after.keys.dtype == cache.keys.dtype
  evicted = np.asarray((cache.positions >= 0) & (after.positions < 0))
  shift = pos_lib.newer_evicted(cache.positions, jnp.asarray(evicted))
  kept = ~evicted
  moving = np.sum(kept & (np.asarray(shift) > 0), axis=-1)
  assert np.all(moving == POLICIES["attention_sink"]["sinks"])
  want = pos_lib.rotate(cache.keys, shift, inverse_frequencies(CFG))
  np.testing.assert_allclose(
      np.asarray(after.keys, np.float32)[kept],
      np.asarray(want.astype(dtype), np.float32)[kept],
      rtol=ROTATION_RTOL[dtype], atol=1e-6)
