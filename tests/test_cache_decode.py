"""Decoding with the cache gives what recomputing the whole sequence gives."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import pad_batch, prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights


@pytest.fixture(scope="module")
def lm():
  cfg = tiny_config()
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                              jnp.float32))


def full_logits(lm, sequences):
  """Logits [B, T, V] of each whole sequence in one uncached pass."""
  tokens, lengths = pad_batch(sequences)
  cache = init_cache(lm.cfg, len(sequences), tokens.shape[1], jnp.float32)
  logits, _ = steps.forward(lm.graphdef, lm.params, cache, jnp.asarray(tokens),
                            jnp.asarray(lengths), policy=KeepAll())
  return np.asarray(logits)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_ragged_decode_matches_recompute(lm, chunk):
  rng = np.random.default_rng(chunk)
  prompt_lengths = [5, 17, 11]
  num_decode = 6
  sequences = [list(rng.integers(0, lm.cfg.vocab_size, n + num_decode))
               for n in prompt_lengths]
  want = full_logits(lm, sequences)

  cache = init_cache(lm.cfg, 3, 40, jnp.float32)
  prompts = [s[:n] for s, n in zip(sequences, prompt_lengths)]
  last, cache = prefill(lm, cache, prompts, KeepAll(), chunk=chunk)
  for b, n in enumerate(prompt_lengths):
    np.testing.assert_allclose(last[b], want[b, n - 1], rtol=1e-5, atol=1e-5)
  active = jnp.ones(3, bool)
  for i in range(num_decode - 1):
    tokens = jnp.array([s[n + i] for s, n in zip(sequences, prompt_lengths)])
    _, logits, cache = steps.decode_step(
        lm.graphdef, lm.params, cache, tokens, active, jax.random.key(0),
        policy=KeepAll(), sampling=Sampling())
    for b, n in enumerate(prompt_lengths):
      np.testing.assert_allclose(logits[b], want[b, n + i], rtol=1e-5,
                                 atol=1e-5)
  np.testing.assert_array_equal(
      cache.lengths, np.array(prompt_lengths) + num_decode - 1)


def test_inactive_sequence_is_untouched(lm):
  cache = init_cache(lm.cfg, 2, 16, jnp.float32)
  _, cache = prefill(lm, cache, [[3, 4, 5], [6, 7]], KeepAll())
  before = jax.tree.map(np.asarray, cache)
  _, _, cache = steps.decode_step(
      lm.graphdef, lm.params, cache, jnp.array([9, 9]), jnp.array([True, False]),
      jax.random.key(0), policy=KeepAll(), sampling=Sampling())
  np.testing.assert_array_equal(cache.positions[:, 1], before.positions[:, 1])
  np.testing.assert_array_equal(cache.keys[:, 1], before.keys[:, 1])
  assert list(np.asarray(cache.lengths)) == [4, 2]


def test_decode_step_compiles_once(lm):
  cache = init_cache(lm.cfg, 2, 16, jnp.float32)
  _, cache = prefill(lm, cache, [[3, 4, 5], [6, 7]], KeepAll())
  counted = chex.assert_max_traces(steps.decode_step.__wrapped__, n=1)
  step = jax.jit(counted, static_argnames=("graphdef", "policy", "sampling"),
                 donate_argnames=("cache",))
  for i in range(4):
    _, _, cache = step(lm.graphdef, lm.params, cache, jnp.array([i, i]),
                       jnp.array([True, i % 2 == 0]), jax.random.key(i),
                       policy=KeepAll(), sampling=Sampling())


@pytest.mark.parametrize("policy,sampling", [
    ("full", Sampling()), ("full", Sampling(temperature=0.8, top_k=20)),
    ("attention_sink(budget=12)", Sampling()),
    ("h2o(budget=12)", Sampling(temperature=1.0))])
def test_device_loop_equals_the_streaming_loop(lm, policy, sampling):
  """``decode`` without a callback runs every step in one on-device loop;
  with one, a jitted step per token. Same tokens, same stops, same cache."""
  from lmcache_jax.engine.generate import generate
  from policies.registry import EVICTION
  rng = np.random.default_rng(3)
  prompts = [rng.integers(2, lm.cfg.vocab_size, n).tolist() for n in (9, 4)]
  run = lambda on_token, stop: generate(  # noqa: E731
      lm, prompts, max_new_tokens=10, sampling=sampling,
      key=jax.random.key(1), policy=EVICTION.make(policy), stop_tokens=stop,
      on_token=on_token)
  streamed = run(lambda *a: None, (1,))
  # stop on a token the first sequence draws mid-way: it ends early there
  stop = (streamed.tokens[0][4],)
  for stops in ((1,), stop):
    want = run(lambda *a: None, stops)
    got = run(None, stops)
    assert got.tokens == want.tokens
    assert got.finished == want.finished
    for a, b in zip(jax.tree.leaves(got.cache), jax.tree.leaves(want.cache)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(got.tokens[0]) <= 5 and got.finished[0]
