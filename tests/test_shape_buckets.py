"""Shapes that follow a text's length come in a few buckets, so a long run
compiles a bounded number of programs, and the padding changes no result."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps
from lmcache_jax.engine.buckets import bucket, cache_capacity
from lmcache_jax.engine.generate import generate
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from policies.registry import EVICTION
from test_eviction import POLICIES


def load(**overrides):
  cfg = tiny_config(**overrides)
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                              jnp.float32))


def test_buckets_are_few_and_pad_by_at_most_a_quarter():
  assert [bucket(n) for n in (1, 16, 17, 21, 33, 100, 1585, 1995, 2049)] == [
      16, 16, 20, 24, 40, 112, 1792, 2048, 2560]
  sizes = np.arange(1, 4097)
  buckets = np.array([bucket(int(n)) for n in sizes])
  assert len(set(buckets)) == 1 + 4 * 8   # 16, then 4 per doubling to 4096
  assert np.all(buckets >= sizes)
  assert np.all(buckets[16:] <= 1.25 * sizes[16:])
  assert all(bucket(int(b)) == b for b in set(buckets))
  with pytest.raises(ValueError, match="must be positive, got 0"):
    bucket(0)


def test_only_a_cache_of_the_whole_context_is_bucketed():
  """A smaller cache's size decides when its rows evict: it stays as the
  policy asks (budget + the room for a pass or the decoded tokens)."""
  assert cache_capacity(KeepAll(), 1593, 512, 8) == 1792
  snapkv = EVICTION.make("snapkv", budget=250, window=8)
  assert cache_capacity(snapkv, 2000, 64, 8) == 250 + 64
  assert cache_capacity(snapkv, 300, 64, 8) == 320   # 300 fits: bucketed


@pytest.mark.parametrize("name", ["full", "attention_sink", "snapkv", "h2o"])
def test_padded_shapes_give_the_unpadded_results(name):
  """The default generation pads the prompts (35 tokens, one pass of 40)
  and the cache (41 slots of context, 48); given the exact pass and
  capacity, the results are the same: tokens, kept positions, and logits,
  keys, values and scores to float32 rounding (other shapes, other sums)."""
  lm = load()
  policy = (KeepAll() if name == "full"
            else EVICTION.make(name, budget=16, **POLICIES[name]))
  rng = np.random.default_rng(4)
  prompts = [rng.integers(2, 97, n).tolist() for n in (35, 20)]
  padded = generate(lm, prompts, max_new_tokens=6, policy=policy,
                    stop_tokens=())
  exact = generate(lm, prompts, max_new_tokens=6, policy=policy,
                   stop_tokens=(), capacity=41, prefill_chunk=35)
  assert (padded.cache.capacity, exact.cache.capacity) == (48, 41)
  assert padded.tokens == exact.tokens
  np.testing.assert_allclose(padded.prompt_logits, exact.prompt_logits,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(padded.cache.lengths, exact.cache.lengths)
  for got, want in zip(live_rows(padded.cache), live_rows(exact.cache)):
    np.testing.assert_array_equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def live_rows(cache):
  """Per (layer, sequence, head) row: its live positions, sorted, and their
  keys, values and scores in that order."""
  pos = np.asarray(cache.positions)
  keys, values = np.asarray(cache.keys), np.asarray(cache.values)
  scores = np.asarray(cache.scores)
  for row in np.ndindex(pos.shape[:3]):
    order = np.argsort(pos[row])
    order = order[pos[row][order] >= 0]
    yield (pos[row][order], keys[row][order], values[row][order],
           scores[row][order])


def test_many_lengths_compile_a_bounded_number_of_programs():
  """200 prompts of 124 to 251 tokens (each length once or twice) compile a
  prefill per (width, capacity) bucket pair and a decode loop per capacity
  bucket, instead of one of each per length."""
  lm = load(name="tiny-buckets", num_layers=1, max_context=512)
  rng = np.random.default_rng(0)
  lengths = rng.permutation(np.tile(np.arange(124, 252), 2))[:200]
  assert len(set(lengths)) > 100
  forward, loop = steps.forward._cache_size(), steps.decode_loop._cache_size()
  for n in lengths:
    generate(lm, [rng.integers(2, 97, int(n)).tolist()], max_new_tokens=5,
             stop_tokens=())
  capacities = {bucket(int(n) + 5) for n in lengths}
  passes = {(bucket(int(n)), bucket(int(n) + 5)) for n in lengths}
  assert (len(capacities), len(passes)) == (4, 8)
  assert steps.decode_loop._cache_size() - loop == len(capacities)
  assert steps.forward._cache_size() - forward == len(passes)
