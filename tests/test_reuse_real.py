"""The real SmolLM2-135M with a 2K-token cached prefix: exact, and how much faster.

Prints the ratio of time to first token (recompute / warm) measured in this
one run; the assertion is exactness, the ratio is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax import models
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.data import shakespeare
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.store import (DiskTier, HostTier, KVStore, Layout,
                               model_fingerprint)
from policies.replacement.lru import LRU

PREFIX, QUESTION, CHUNK = 2048, 24, 512


def recompute(lm, prompt, capacity):
  start = time.perf_counter()
  cache = init_cache(lm.cfg, 1, capacity, lm.dtype)
  logits, cache = prefill(lm, cache, [prompt], KeepAll(), CHUNK)
  return jax.block_until_ready(logits), cache, time.perf_counter() - start


@pytest.mark.real_model
def test_real_model_2k_prefix_reuse(tmp_path):
  lm = models.load("smollm2-135m", jnp.float32)
  tokens = lm.tokenizer.encode(shakespeare.load_text("hamlet"))
  prompt = tokens[:PREFIX + QUESTION]
  capacity = len(prompt) + 8
  store = KVStore(Layout.of(init_cache(lm.cfg, 1, 256, lm.dtype)),
                  [HostTier(1 << 30, LRU()),
                   DiskTier(str(tmp_path), 1 << 30, LRU())],
                  model_fingerprint=model_fingerprint(lm), chunk_size=256)
  recompute(lm, prompt[:CHUNK], capacity)  # compiles the chunk's shapes
  cold_logits, cache, cold_s = recompute(lm, prompt, capacity)
  store.store(prompt, cache, wait=True)
  del cache
  runs = [generate_with_store(lm, [prompt], store, max_new_tokens=1,
                              capacity=capacity, prefill_chunk=CHUNK,
                              store_generated=False) for _ in range(2)]
  warm = runs[-1]  # the first compiled the suffix's shapes
  assert warm.hit_tokens == [PREFIX] and warm.sources == [{"host": 8}]
  np.testing.assert_allclose(warm.generation.prompt_logits, cold_logits,
                             rtol=1e-4, atol=1e-4)
  print(f"\nsmollm2-135m, {PREFIX}-token cached prefix + {QUESTION} new tokens: "
        f"TTFT recompute {cold_s:.3f} s, warm (host) {warm.ttft_s:.3f} s, "
        f"ratio {cold_s / warm.ttft_s:.1f}x")
