"""Eviction inside the real engine: prefill, decode and position re-assignment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps
from lmcache_jax.engine.generate import decode, generate
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights
from policies.registry import EVICTION
from test_eviction import POLICIES


def load(cfg):
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                              jnp.float32))


@pytest.fixture(scope="module")
def lm():
  return load(tiny_config())


def run(lm, policy, prompts, new_tokens=6, capacity=None):
  return generate(lm, prompts, max_new_tokens=new_tokens, policy=policy,
                  capacity=capacity, prefill_chunk=8)


def test_full_is_bit_identical_to_no_policy(lm):
  prompts = [[5, 9, 2, 7, 7, 3, 11, 4, 8, 1 + 2], [4, 4, 6]]
  plain = generate(lm, prompts, max_new_tokens=5, prefill_chunk=8)
  named = run(lm, EVICTION.make("full"), prompts, new_tokens=5)
  assert plain.tokens == named.tokens
  np.testing.assert_array_equal(plain.prompt_logits, named.prompt_logits)
  for a, b in zip(jax.tree.leaves(plain.cache), jax.tree.leaves(named.cache)):
    np.testing.assert_array_equal(a, b)


# One policy per mechanism path: re-rotation, observation window, cross-head
# selection. (pyramidkv never qualifies: its upper layers keep less than the
# mean budget.)
@pytest.mark.parametrize("name", ["attention_sink", "snapkv", "adakv"])
def test_policy_that_never_needs_to_evict_equals_full(lm, name):
  """Plan/update are exact no-ops while everything fits: same bits as full."""
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(2, 97, 13)), list(rng.integers(2, 97, 9))]
  context = 13 + 6
  want = run(lm, KeepAll(), prompts, capacity=context)
  policy = EVICTION.make(name, budget=context, **POLICIES[name])
  got = run(lm, policy, prompts, capacity=context)
  assert want.tokens == got.tokens
  np.testing.assert_array_equal(want.prompt_logits, got.prompt_logits)
  np.testing.assert_array_equal(want.cache.keys, got.cache.keys)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decoding_far_past_the_budget_when_evicting_every_step(lm, name):
  policy = EVICTION.make(name, budget=8, evict_every=1, **POLICIES[name])
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(2, 97, 21)), list(rng.integers(2, 97, 5))]
  result = generate(lm, prompts, max_new_tokens=30, policy=policy,
                    prefill_chunk=4, stop_tokens=(), sampling=Sampling(1.0),
                    key=jax.random.key(0))
  cache = result.cache
  assert cache.capacity == policy.max_row_slots + 4
  np.testing.assert_array_equal(cache.lengths, [21 + 29, 5 + 29])
  live = np.asarray(cache.live_slots())
  if name == "adakv":
    assert np.all(live.sum(-1) == cache.num_kv_heads * 8)
  else:
    budgets = np.asarray(policy.layer_budgets(cache.num_layers))
    np.testing.assert_array_equal(live, np.broadcast_to(
        budgets[:, None, None], live.shape))
  assert all(len(t) == 30 for t in result.tokens)
  assert np.all(np.isfinite(result.prompt_logits))


@pytest.mark.parametrize("name", ["knorm", "random"])
def test_decoding_never_evicts_the_token_just_written(lm, name):
  """knorm and random protect nothing of their own: the engine must still
  keep the token each decoding step writes (greedy, so each run extends the
  last by one step)."""
  policy = EVICTION.make(name, budget=8, evict_every=1, **POLICIES[name])
  rng = np.random.default_rng(8)
  prompts = [list(rng.integers(2, 97, 21)), list(rng.integers(2, 97, 13))]
  for new_tokens in range(2, 14):
    cache = generate(lm, prompts, max_new_tokens=new_tokens, policy=policy,
                     prefill_chunk=4, stop_tokens=()).cache
    newest = np.asarray(cache.lengths - 1)[None, :, None, None]
    kept = np.any(np.asarray(cache.positions) == newest, axis=-1)
    assert kept.all(), (f"step {new_tokens - 1}: the token just written was "
                        f"evicted in {np.sum(~kept)} of {kept.size} rows")


@pytest.mark.parametrize("name", ["snapkv", "knorm"])
def test_decoding_keeps_every_new_token_when_evict_every_is_0(lm, name):
  policy = EVICTION.make(name, budget=8, **POLICIES[name])
  assert policy.evict_every == 0 and policy.decode_mode == "never"
  rng = np.random.default_rng(9)
  prompts = [list(rng.integers(2, 97, 21)), list(rng.integers(2, 97, 13))]
  new_tokens = 12
  cache = init_cache(lm.cfg, 2, policy.cache_capacity(33, 4, new_tokens),
                     jnp.float32)
  logits, cache = prefill(lm, cache, prompts, policy, chunk=4)
  np.testing.assert_array_equal(cache.live_slots(), 8)
  out = decode(lm, cache, logits, max_new_tokens=new_tokens,
               policy=policy.decoding(), stop_tokens=())
  positions = np.asarray(out.cache.positions)
  np.testing.assert_array_equal(out.cache.live_slots(), 8 + new_tokens - 1)
  for b, length in enumerate((21, 13)):
    decoded = set(range(length, length + new_tokens - 1))
    for row in positions[:, b].reshape(-1, positions.shape[-1]):
      assert decoded <= set(row.tolist())


# A ragged batch (36 and 29 tokens) whose last chunks are shorter than the
# window (8) at every chunk size tried but the single-chunk one.
SPAN_PROMPTS = [list(np.random.default_rng(10).integers(2, 97, 36)),
                list(np.random.default_rng(11).integers(2, 97, 29))]


def kept_rows(cache):
  """Each (layer, sequence, head) row's kept positions, sorted."""
  return np.sort(np.asarray(cache.positions), axis=-1)


@pytest.mark.parametrize("spec", ["snapkv(window=8)", "pyramidkv(window=8)",
                                  "adakv(inner='snapkv(window=8)')"])
def test_the_observation_window_spans_prefill_chunks(lm, spec):
  """The prompt's last ``window`` queries vote whatever the chunking: the
  kept tokens equal those of a single-chunk prefill."""
  policy = EVICTION.make(spec, budget=14)

  def compressed(chunk):
    cache = init_cache(lm.cfg, 2, 40, jnp.float32)
    return kept_rows(prefill(lm, cache, SPAN_PROMPTS, policy, chunk)[1])

  want = compressed(64)
  for chunk in (3, 5, 7, 16):
    last = [len(p) - (len(p) - 1) // chunk * chunk for p in SPAN_PROMPTS]
    assert min(last) < 8, last
    np.testing.assert_array_equal(compressed(chunk), want,
                                  err_msg=f"chunk {chunk}")


def test_compress_after_prefill_when_the_prompt_fits(lm):
  policy = EVICTION.make("snapkv", budget=6, window=2, kernel=3)
  prompt = list(np.random.default_rng(3).integers(2, 97, 30))
  cache = init_cache(lm.cfg, 1, 32, jnp.float32)
  logits_deferred, cache = prefill(lm, cache, [prompt], policy, chunk=8)
  np.testing.assert_array_equal(cache.live_slots(), 6)
  # The prompt's logits are those of full attention: nothing was evicted
  # until the whole prompt had been seen.
  full_cache = init_cache(lm.cfg, 1, 32, jnp.float32)
  logits_full, _ = prefill(lm, full_cache, [prompt], KeepAll(), chunk=8)
  np.testing.assert_array_equal(logits_deferred, logits_full)
  # A cache too small for the prompt streams it, evicting as it goes.
  small = init_cache(lm.cfg, 1, policy.cache_capacity(30, 8), jnp.float32)
  logits_streamed, small = prefill(lm, small, [prompt], policy, chunk=8)
  np.testing.assert_array_equal(small.live_slots(), 6)
  assert not np.allclose(logits_streamed, logits_full)


def test_attention_sink_sees_kept_tokens_as_contiguous():
  """StreamingLLM's position re-assignment, checked against recomputation.

  In a one-layer model a token's key and value depend only on the token and
  its position, so decoding under attention_sink must give the logits of a
  fresh pass over [sinks + recent window + new token] at positions 0..n.
  """
  cfg = tiny_config(num_layers=1)
  lm = load(cfg)
  budget, sinks = 7, 2
  policy = EVICTION.make("attention_sink", budget=budget, sinks=sinks)
  tokens = list(np.random.default_rng(4).integers(2, 97, 40))
  cache = init_cache(cfg, 1, policy.cache_capacity(len(tokens), 1),
                     jnp.float32)
  bound = policy.bind(cfg)
  for t, token in enumerate(tokens):
    logits, cache = steps.forward(lm.graphdef, lm.params, cache,
                                  jnp.array([[token]]), jnp.array([1]),
                                  policy=bound, logits_for="last")
    kept = tokens[:min(sinks, t)] + tokens[max(sinks, t - budget + sinks):t]
    seen = kept + [token]
    fresh = init_cache(cfg, 1, len(seen), jnp.float32)
    want, _ = steps.forward(lm.graphdef, lm.params, fresh,
                            jnp.array([seen]), jnp.array([len(seen)]),
                            policy=KeepAll(), logits_for="last")
    np.testing.assert_allclose(logits, want, rtol=2e-5, atol=2e-5,
                               err_msg=f"step {t}")


def test_sliding_window_is_not_contiguous_positions():
  """Without re-assignment the distance to old tokens keeps growing: the same
  recomputation as above must then differ (the test above can fail)."""
  cfg = tiny_config(num_layers=1)
  lm = load(cfg)
  policy = EVICTION.make("attention_sink", budget=7, sinks=2, reposition=False)
  tokens = list(np.random.default_rng(4).integers(2, 97, 30))
  cache = init_cache(cfg, 1, policy.cache_capacity(len(tokens), 1),
                     jnp.float32)
  for token in tokens:
    logits, cache = steps.forward(lm.graphdef, lm.params, cache,
                                  jnp.array([[token]]), jnp.array([1]),
                                  policy=policy, logits_for="last")
  seen = tokens[:2] + tokens[-6:]
  fresh = init_cache(cfg, 1, len(seen), jnp.float32)
  want, _ = steps.forward(lm.graphdef, lm.params, fresh, jnp.array([seen]),
                          jnp.array([len(seen)]), policy=KeepAll(),
                          logits_for="last")
  assert not np.allclose(logits, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 20])
def test_heads_that_keep_different_tokens_attend_only_to_their_own(steps):
  """Per-head policies leave each kv head its own set of live slots; a query
  group must see exactly its head's set (checked against uniform masks)."""
  from lmcache_jax import attention
  rng = np.random.default_rng(5)
  batch, heads, group, slots, dim = 1, 2, 3, 40, 8
  keys = jnp.asarray(rng.standard_normal((batch, heads, slots, dim)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((batch, heads, slots, dim)), jnp.float32)
  base = np.tile(rng.permutation(slots)[None, None], (batch, heads, 1))
  drop = [rng.choice(slots, 15, replace=False) for _ in range(heads)]
  per_head = base.copy()
  for h in range(heads):
    per_head[:, h, np.isin(base[0, h], drop[h])] = -1
  q = jnp.asarray(rng.standard_normal((batch, steps, heads * group, dim)),
                  jnp.float32)
  q_pos = jnp.asarray(slots - steps + np.arange(steps))[None]
  weights = jnp.ones((batch, steps))
  layer = lambda pos: attention.LayerKV(keys, values, jnp.asarray(pos, jnp.int32),
                                        jnp.zeros((batch, heads, slots)))
  out, mass = attention.attend_slots(q, layer(per_head), q_pos, weights)
  for h in range(heads):
    uniform = np.where(np.isin(base, drop[h]), -1, base)
    want, want_mass = attention.attend_slots(q, layer(uniform), q_pos, weights)
    group_slice = slice(h * group, (h + 1) * group)
    np.testing.assert_allclose(out[:, :, group_slice], want[:, :, group_slice],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass[:, h], want_mass[:, h], rtol=1e-5,
                               atol=1e-6)


def test_attention_sink_in_a_quantized_cache_rotates_the_exact_sinks():
  """Sinks kept exact by the quant plan are re-rotated there; the decode then
  tracks the float cache's up to int8 noise. Without exact sinks: an error."""
  from lmcache_jax.quant.plan import QuantPlan
  cfg = tiny_config(num_layers=1, head_dim=32, num_heads=4)
  lm = load(cfg)
  policy = EVICTION.make("attention_sink", budget=7).bind(cfg)
  tokens = list(np.random.default_rng(6).integers(2, 97, 24))

  def decode_all(quant):
    cache = init_cache(cfg, 1, policy.cache_capacity(len(tokens), 1),
                       jnp.float32, **({} if quant is None else {"quant": quant}))
    out = []
    for token in tokens:
      logits, cache = steps.forward(lm.graphdef, lm.params, cache,
                                    jnp.array([[token]]), jnp.array([1]),
                                    policy=policy, logits_for="last")
      out.append(np.asarray(logits))
    return np.stack(out)

  exact = decode_all(None)
  quantized = decode_all(QuantPlan.uniform(cfg, "int8", group_size=32, sinks=4))
  np.testing.assert_allclose(quantized, exact, atol=0.05)
  # the rotated sinks are written back to their copies in the cache dtype
  with pytest.raises(ValueError, match="copy_bits=16"):
    decode_all(QuantPlan.uniform(cfg, "int8", group_size=32, sinks=4,
                                 copy_bits=8))
  with pytest.raises(ValueError, match="sinks exact"):
    decode_all(QuantPlan.uniform(cfg, "int8", group_size=32, sinks=0))


@pytest.mark.parametrize("name", ["knorm", "h2o"])
def test_scoring_policies_run_on_a_quantized_cache(name):
  from lmcache_jax.quant.plan import QuantPlan
  cfg = tiny_config(num_layers=2, head_dim=32, num_heads=4)
  lm = load(cfg)
  policy = EVICTION.make(name, budget=8)
  quant = QuantPlan.uniform(cfg, "int4", group_size=32)
  cache = init_cache(cfg, 1, policy.cache_capacity(40, 4), jnp.float32,
                     quant=quant)
  prompt = list(np.random.default_rng(7).integers(2, 97, 30))
  logits, cache = prefill(lm, cache, [prompt], policy, chunk=4)
  assert np.all(np.isfinite(logits))
  np.testing.assert_array_equal(cache.live_slots(), 8)


def test_decoding_a_cache_never_prefilled_under_attention_sink(lm):
  """engine.decode gives the cache the sinks' origins before its loop (the
  loop's carry cannot change structure when the first eviction adds them)."""
  policy = EVICTION.make("attention_sink", budget=6, sinks=2)
  cache = init_cache(lm.cfg, 1, policy.cache_capacity(20, 1, 20), jnp.float32)
  out = decode(lm, cache, jnp.zeros((1, lm.cfg.vocab_size)), max_new_tokens=20,
               policy=policy, stop_tokens=())
  np.testing.assert_array_equal(out.cache.live_slots(), 6)
  # 19 tokens fed, 6 kept: each sink has moved past the 13 evicted
  np.testing.assert_array_equal(out.cache.sink_origins.shift, 13)


def test_a_session_saved_under_attention_sink_resumes_with_its_origins(
    lm, tmp_path):
  from lmcache_jax.engine.session import (from_generation, restore_session,
                                          resume, save_session)
  policy = EVICTION.make("attention_sink", budget=8, sinks=2)
  prompts = [list(np.random.default_rng(12).integers(2, 97, 21))]
  generation = run(lm, policy, prompts, new_tokens=10, capacity=40)
  session = from_generation(prompts, generation)
  save_session(str(tmp_path / "s"), session, lm)
  restored = restore_session(str(tmp_path / "s"), lm)
  for a, b in zip(jax.tree.leaves(session.cache),
                  jax.tree.leaves(restored.cache)):
    np.testing.assert_array_equal(a, b)
  assert restored.cache.sink_origins.shift.min() > 0
  later, _ = resume(lm, restored, [[5, 6, 7]], max_new_tokens=4, policy=policy)
  assert all(len(t) == 4 for t in later.tokens)
