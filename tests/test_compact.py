"""cache.compact: the same live tokens in fewer slots, attended the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.compact import compact, compactable
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.data import passkey as passkey_data
from lmcache_jax.engine import steps
from lmcache_jax.engine.buckets import bucket
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import EVICTION

# head_dim 32 so packed int4 codes fill whole words with one group per head
CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
PROMPTS = (29, 18)
DECODED = 5


@pytest.fixture(scope="module")
def models():
  weights = tiny_weights(CFG)
  return {dtype: LoadedModel.from_module(from_weights(CFG, weights, dtype))
          for dtype in (jnp.float32, jnp.bfloat16)}


def mixed_plan(**knobs):
  """int4 and int8 heads in every layer: parts whose rows are not the heads."""
  formats = (("int4", "int8", "int4"), ("int8", "int4", "int4"),
             ("int4", "int4", "int8"))
  return QuantPlan(formats, np.ones((3, 3, 32), np.float32), 32,
                   knobs.get("residual", 0), knobs.get("sinks", 0))


def compressed(lm, policy, quant):
  """Two ragged prompts prefilled into a cache of the whole prompt and
  compressed to the policy's budget: live slots with holes between them."""
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(2, CFG.vocab_size, n)) for n in PROMPTS]
  cache = init_cache(CFG, len(prompts), max(PROMPTS) + DECODED, lm.dtype,
                     quant=quant)
  logits, cache = prefill(lm, cache, prompts, policy, chunk=8)
  return logits, cache


def decode_logits(lm, cache, policy, logits, how):
  """The logits after each of DECODED next tokens: decoded greedily one step
  at a time (``how="decode"``), or fed as one chunk (``"chunk"``: the
  prefill path's attention over the cached slots; XLA on the CPU has no
  bfloat16 decode step, whose dot asks for a float32 result)."""
  if how == "chunk":
    tokens = np.random.default_rng(5).integers(2, CFG.vocab_size,
                                               (len(PROMPTS), DECODED))
    out, cache = steps.forward(lm.graphdef, lm.params, cache,
                               jnp.asarray(tokens, jnp.int32),
                               jnp.full(len(PROMPTS), DECODED, jnp.int32),
                               policy=policy)
    return np.asarray(out, np.float32), cache
  out = [np.asarray(logits, np.float32)]
  for _ in range(DECODED):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, logits, cache = steps.decode_step(
        lm.graphdef, lm.params, cache, token, jnp.ones(len(PROMPTS), bool),
        jax.random.key(0), policy=policy, sampling=Sampling())
    out.append(np.asarray(logits, np.float32))
  return np.stack(out), cache


def live_by_position(cache):
  """Per row, the live positions in position order and their scores."""
  pos = np.asarray(cache.positions)
  scores = np.asarray(cache.scores)
  order = np.argsort(np.where(pos >= 0, pos, np.iinfo(np.int32).max), -1,
                     kind="stable")
  pos, scores = (np.take_along_axis(a, order, -1) for a in (pos, scores))
  return np.where(pos >= 0, pos, -1), np.where(pos >= 0, scores, 0.0)


SNAPKV = ("snapkv", dict(window=2, kernel=3))   # never evicts when decoding
H2O = ("h2o", dict(evict_every=1))              # evicts every step
CASES = {   # dtype, quant plan, policy, how the next tokens are fed
    "f32-snapkv": (jnp.float32, None, SNAPKV, "decode"),
    "f32-h2o": (jnp.float32, None, H2O, "decode"),
    "bf16-snapkv-chunk": (jnp.bfloat16, None, SNAPKV, "chunk"),
    "int4-sinks-window": (
        jnp.float32,
        QuantPlan.uniform(CFG, "int4", group_size=32, residual=4, sinks=2),
        H2O, "decode"),
    "int4-int8-int8-copies": (
        jnp.float32, mixed_plan(residual=8, sinks=2).replace(copy_bits=8),
        SNAPKV, "decode"),
    "int4-int8-chunk": (
        jnp.float32, mixed_plan(residual=8, sinks=2), SNAPKV, "chunk"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoding_from_the_compacted_cache_equals_the_original(models, case):
  dtype, quant, (name, knobs), how = CASES[case]
  lm = models[dtype]
  policy = EVICTION.make(name, budget=10, **knobs).bind(CFG)
  logits, cache = compressed(lm, policy, quant)
  pos = np.asarray(cache.positions)
  live = pos >= 0
  # eviction left holes: some row has an empty slot before a live one
  assert np.any(np.cumsum(~live, -1) * live > 0)
  capacity = policy.cache_capacity(max(PROMPTS) + DECODED,
                                   DECODED if how == "chunk" else 1, DECODED)
  # one spare slot: a row the new tokens fill evicts to its budget whatever
  # the decode mode, which would fire in the small cache only
  capacity += 1
  assert capacity < cache.capacity
  small = compact(cache, capacity)
  assert small.capacity == capacity
  assert small.nbytes < cache.nbytes
  np.testing.assert_array_equal(small.lengths, cache.lengths)
  for got, want in zip(live_by_position(small), live_by_position(cache)):
    np.testing.assert_array_equal(got[..., :capacity], want[..., :capacity])
  # live slots move to the front of their row, in slot order
  small_live = np.asarray(small.positions) >= 0
  n = live.sum(-1, keepdims=True)
  np.testing.assert_array_equal(small_live, np.arange(capacity) < n)
  if quant is not None:
    freed = check_exact_copies(cache, small)
    # snapkv protects no sinks and a smaller window than the plan's residual
    assert freed > 0 or name != "snapkv"

  decoding = policy.decoding()
  want, want_cache = decode_logits(lm, cache, decoding, logits, how)
  got, got_cache = decode_logits(lm, small, decoding, logits, how)
  # slots are summed in another order (and packed ones in other blocks)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5 if quant is None else 1e-4
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  # the same tokens stay, with the same score state
  for a, b in zip(live_by_position(got_cache), live_by_position(want_cache)):
    np.testing.assert_allclose(a[..., :capacity], b[..., :capacity],
                               rtol=1e-4, atol=1e-5)


def check_exact_copies(before, after):
  """Every copy of a live token mirrors the slot that token moved to; copies
  of freed slots mirror nothing. Returns how many copies were of freed slots."""
  freed = 0
  for kv_before, kv_after in ((before.keys, after.keys),
                              (before.values, after.values)):
    np.testing.assert_array_equal(kv_after.exact, kv_before.exact)
    old = np.asarray(kv_before.exact_slots)
    new = np.asarray(kv_after.exact_slots)
    old_pos = np.take_along_axis(np.asarray(before.positions),
                                 np.maximum(old, 0), -1)
    new_pos = np.take_along_axis(np.asarray(after.positions),
                                 np.maximum(new, 0), -1)
    mirrors_live = (old >= 0) & (old_pos >= 0)
    assert mirrors_live.any()
    freed += int(np.sum((old >= 0) & (old_pos < 0)))
    np.testing.assert_array_equal(new >= 0, mirrors_live)
    np.testing.assert_array_equal(np.where(mirrors_live, new_pos, -1),
                                  np.where(mirrors_live, old_pos, -1))
  return freed


def test_compact_refuses_a_capacity_below_the_live_slots(models):
  lm = models[jnp.float32]
  policy = EVICTION.make("h2o", budget=10).bind(CFG)
  _, cache = compressed(lm, policy, None)
  with pytest.raises(ValueError, match="holds 10 live slots, more than the "
                                       "new capacity of 9"):
    compact(cache, 9)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="positive whole number"):
      compact(cache, bad)
  with pytest.raises(ValueError, match="compact only shrinks"):
    compact(cache, cache.capacity + 1)
  assert compactable(cache) and compact(cache, cache.capacity) is cache


def test_compact_refuses_a_payload_indexed_by_groups_of_slots():
  """KIVI's keys share a grid per group of slots: they cannot move alone."""
  plan = QuantPlan.uniform(CFG, "int4", group_size=32, residual=4).replace(
      key_layout="channel", key_group=4)
  cache = init_cache(CFG, 1, 8, jnp.float32, quant=plan)
  assert not compactable(cache)
  with pytest.raises(ValueError, match="'scale' holds 2 entries for 8 slots"):
    compact(cache, 4)


def test_retrieval_reports_the_compact_cache_bytes():
  """mode=prefill answers from, and reports, the cache of the policy's
  capacity; the whole-prompt cache shows as kv_bytes_prefill. The answers
  are those of the whole-prompt cache."""
  from experiments.context import RunContext
  from experiments.tasks.passkey import passkey as passkey_task
  from lmcache_jax.engine.generate import decode
  from test_tasks_retrieval import TOK, CharTokenizer, retrieval_config

  cfg = tiny_config(vocab_size=len(CharTokenizer.vocab) + 2)
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                            jnp.float32), tokenizer=TOK)
  policy = EVICTION.make("snapkv", budget=16, window=4).bind(cfg)
  config = retrieval_config("prefill")
  ctx = RunContext(config=config, lm=lm, policy=policy)
  results = passkey_task(ctx)
  total = 300 + 3
  cue = len(passkey_data.CUE)   # one token per character
  capacity = policy.cache_capacity(total, cue, cue + 3)
  assert results["cache_capacity"] == capacity == 16 + cue + 3
  bytes_of = lambda slots: init_cache(cfg, 2, slots, jnp.float32).payload_nbytes
  assert results["kv_bytes"] == bytes_of(capacity)
  assert results["kv_bytes_prefill"] == bytes_of(bucket(total))   # 320
  assert results["kv_bytes"] < results["kv_bytes_prefill"] / 8

  # the same prompts (the task's seeds) through the whole-prompt cache
  samples = [passkey_data.passkey(TOK, 300, depth, digits=3, seed=s)
             for s, depth in zip((0, 1), (0.2, 0.8))]
  cache = init_cache(cfg, 2, total, jnp.float32)
  _, cache = prefill(lm, cache, [s.prompt for s in samples], policy, 64)
  logits, cache = prefill(lm, cache, [s.cue for s in samples],
                          policy.decoding(), 64)
  out = decode(lm, cache, logits, max_new_tokens=3, policy=policy.decoding(),
               stop_tokens=())
  assert [r["output"] for r in results["samples"]] == [
      TOK.decode(t) for t in out.tokens]
