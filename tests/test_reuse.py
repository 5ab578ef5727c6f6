"""Prefix reuse is exact: warm logits and tokens equal the cold run's."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import run as run_lib
from experiments.tasks.reuse import timed_cold
from lmcache_jax.engine.generate import generate
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.models.llama import from_weights
from lmcache_jax.store.crypto import load_cipher
from lmcache_jax.store import Layout
from lmcache_jax.store.keys import model_fingerprint
from policies.replacement.lru import LRU
from conftest import tiny_config, tiny_weights
from store_helpers import make_store, tokens_for
# byte_lm: a fixture, a tiny model reading text as bytes
from test_sweep import byte_lm, sweep_config  # noqa: F401

TOL = dict(rtol=1e-5, atol=1e-5)
# One cache and chunk shape for every call keeps compilations few.
SHAPES = dict(capacity=96, prefill_chunk=8)


@pytest.fixture(scope="module")
def lm():
  cfg = tiny_config()
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_warm_equals_cold_from_each_tier(lm, tier, tmp_path):
  doc = tokens_for(0, 40)
  prompts = [doc + tokens_for(1, 5), doc[:17] + tokens_for(2, 9), tokens_for(3, 6)]
  cold = generate(lm, prompts, max_new_tokens=6, **SHAPES)
  tiers = {"device": dict(device_bytes=1 << 20), "host": dict(host_bytes=1 << 20),
           "disk": dict(disk_dir=str(tmp_path), disk_bytes=1 << 20)}[tier]
  store = make_store(model_fingerprint(lm), **tiers)
  first = generate_with_store(lm, [doc + [5]], store, max_new_tokens=2,
                              **SHAPES)
  assert first.hit_tokens == [0] and first.stored_chunks == 5
  store.flush()
  warm = generate_with_store(lm, prompts, store, max_new_tokens=6, **SHAPES)
  assert warm.hit_tokens == [40, 16, 0]
  assert warm.sources[0] == {tier: 5} and warm.sources[2] == {}
  np.testing.assert_allclose(warm.generation.prompt_logits, cold.prompt_logits,
                             **TOL)
  assert warm.generation.tokens == cold.tokens


def test_multiturn_reuses_previous_turns(lm):
  store = make_store(model_fingerprint(lm), host_bytes=1 << 20)
  history = tokens_for(10, 19)
  for turn in range(3):
    cold = generate(lm, [history], max_new_tokens=5, stop_tokens=(-1,),
                    **SHAPES)
    warm = generate_with_store(lm, [history], store, max_new_tokens=5,
                               stop_tokens=(-1,), **SHAPES)
    assert warm.generation.tokens == cold.tokens
    np.testing.assert_allclose(warm.generation.prompt_logits,
                               cold.prompt_logits, **TOL)
    if turn:
      # Everything up to the previous answer's last fed token was stored.
      assert warm.hit_tokens[0] == previous_fed // 8 * 8
    previous_fed = len(history) + len(warm.generation.tokens[0]) - 1
    history = history + warm.generation.tokens[0] + tokens_for(11 + turn, 7)


def test_fully_cached_prompt_still_feeds_its_last_token(lm):
  store = make_store(model_fingerprint(lm), host_bytes=1 << 20)
  prompt = tokens_for(20, 32)
  generate_with_store(lm, [prompt], store, max_new_tokens=1, **SHAPES)
  full = generate(lm, [prompt], max_new_tokens=1, **SHAPES)
  store.store(prompt, full.cache)
  assert store.lookup(prompt) == 32
  warm = generate_with_store(lm, [prompt], store, max_new_tokens=3, **SHAPES)
  assert warm.hit_tokens == [24]
  cold = generate(lm, [prompt], max_new_tokens=3, **SHAPES)
  assert warm.generation.tokens == cold.tokens


def test_other_weights_never_hit(lm):
  store = make_store(model_fingerprint(lm), host_bytes=1 << 20)
  prompt = tokens_for(30, 33)
  generate_with_store(lm, [prompt], store, max_new_tokens=1, **SHAPES)
  cfg = tiny_config()
  other = LoadedModel.from_module(
      from_weights(cfg, tiny_weights(cfg, seed=5), jnp.float32))
  assert store.lookup(prompt) == 32
  # the same chunks, keyed for the other model
  other_store = make_store(model_fingerprint(other), tiers=store.tiers)
  assert other_store.lookup(prompt) == 0


def test_encrypted_store_writes_no_plaintext(lm, tmp_path):
  key_file = tmp_path / "key"
  key_file.write_bytes(os.urandom(32))
  directory = tmp_path / "store"
  prompt = tokens_for(40, 33)
  cold = generate(lm, [prompt], max_new_tokens=4, **SHAPES)
  store = make_store(model_fingerprint(lm), host_bytes=1 << 20,
                     disk_dir=str(directory), disk_bytes=1 << 20,
                     cipher=load_cipher(key_file=str(key_file)))
  generate_with_store(lm, [prompt], store, max_new_tokens=1, **SHAPES)
  store.flush()
  plain = np.asarray(cold.cache.keys[:, 0, :, :8]).tobytes()
  files = list(directory.glob("*.kv"))
  assert len(files) == 4
  for path in files:
    data = path.read_bytes()
    for start in range(0, len(plain) - 32, 256):
      assert plain[start:start + 32] not in data
  for blob in store.tier("host")._values.values():
    assert isinstance(blob, bytes) and plain[:32] not in blob
  reopened = make_store(model_fingerprint(lm), disk_dir=str(directory),
                        disk_bytes=1 << 20,
                        cipher=load_cipher(key_file=str(key_file)))
  warm = generate_with_store(lm, [prompt], reopened, max_new_tokens=4,
                             **SHAPES)
  assert warm.sources == [{"disk": 4}]
  assert warm.generation.tokens == cold.tokens


@pytest.mark.parametrize("outliers", [0, 1])
def test_quantized_cache_stores_its_packed_form(tmp_path, outliers):
  from lmcache_jax.cache.kv_cache import init_cache
  from lmcache_jax.engine.generate import decode
  from lmcache_jax.engine.prefill import prefill
  from lmcache_jax.quant.plan import QuantPlan
  from lmcache_jax.store import DiskTier, HostTier, KVStore, Layout
  cfg = tiny_config(head_dim=32)
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))
  plan = QuantPlan.uniform(cfg, "int4", group_size=32, outliers=outliers)
  new_cache = lambda b, s: init_cache(lm.cfg, b, s, jnp.float32, quant=plan)  # noqa: E731
  prompt = tokens_for(50, 41)
  logits, cache = prefill(lm, new_cache(1, 96), [prompt], lm_policy(), 8)
  cold = decode(lm, cache, logits, max_new_tokens=4)
  layout = Layout.of(new_cache(1, 16))
  store = KVStore(layout, [DiskTier(str(tmp_path), 1 << 20, LRU())],
                  model_fingerprint=model_fingerprint(lm), chunk_size=8)
  dense = KVStore(Layout.of(init_cache(cfg, 1, 16, jnp.float32)),
                  [HostTier(1 << 20, LRU())],
                  model_fingerprint=model_fingerprint(lm), chunk_size=8)
  assert store.chunk_nbytes < dense.chunk_nbytes / 4
  assert store.root != dense.root
  generate_with_store(lm, [prompt], store, max_new_tokens=1, new_cache=new_cache,
                      **SHAPES)
  store.flush()
  warm = generate_with_store(lm, [prompt], store, max_new_tokens=4,
                             new_cache=new_cache, **SHAPES)
  assert warm.sources == [{"disk": 5}]
  assert warm.generation.tokens == cold.tokens
  np.testing.assert_allclose(warm.generation.prompt_logits, cold.prompt_logits,
                             **TOL)


def lm_policy():
  from lmcache_jax.cache.policy import KeepAll
  return KeepAll()


@pytest.mark.parametrize("task", ["reuse", "multiturn"])
def test_cold_baseline_uses_the_warm_runs_cache_format(task, tmp_path, byte_lm):
  """Under --kv_bits the cold run (no store) prefills into a quantized cache
  too: its logits equal the warm run's, and its cache has the same layout."""
  config = sweep_config(tmp_path).unlock()
  del config["sweep"]
  config.task = task
  config.store.update(dict(tiers="host", chunk_size=16))
  config.reuse.update(dict(doc_tokens=48, questions=config.reuse.questions[:1],
                           repeats=1, max_new_tokens=3))
  config.multiturn.update(dict(context_tokens=48, repeats=1, max_new_tokens=3,
                               messages=config.multiturn.messages[:2]))
  # int2 with nothing held exact: a dense cold run would differ at once
  config.quant.update(dict(kv_bits=2.0, group_size=32, residual=0, sinks=0,
                           center_keys=False))
  results = run_lib.run(config, byte_lm)
  assert results["kv_bits"] == 2.0
  for turn in results["turns"]:
    assert turn["hit_tokens"] > 0 or turn.get("turn") == 0
    assert turn["max_logit_diff"] < 1e-4 and turn["answers_equal"]

  ctx = run_lib.build_context(config, byte_lm)
  _, cold = timed_cold(ctx, tokens_for(60, 40), capacity=64, max_new_tokens=2)
  assert Layout.of(cold.cache) == Layout.of(ctx.new_cache(1, 64))
