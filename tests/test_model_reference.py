"""The JAX model against the independent float64 NumPy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps
from lmcache_jax.models.llama import from_weights
from flax import nnx
from reference_model import reference_logits

VARIANTS = {
    "llama": {},
    "tied": dict(tie_embeddings=True),
    "qwen2_bias": dict(qkv_bias=True, rope_theta=1e6),
    "llama3_scaling": dict(rope_theta=500000.0,
                           rope_scaling=(8.0, 1.0, 4.0, 32)),
    "linear_scaling": dict(rope_linear_factor=2.0),
    "mha": dict(num_kv_heads=6),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_float64_reference(variant):
  cfg = tiny_config(**VARIANTS[variant])
  weights = tiny_weights(cfg, seed=hash(variant) % 1000)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=40)
  model = from_weights(cfg, weights, jnp.float32)
  graphdef, params = nnx.split(model)
  cache = init_cache(cfg, 1, 64, jnp.float32)
  logits, _ = steps.forward(graphdef, params, cache, jnp.asarray(tokens[None]),
                            jnp.array([40]), policy=KeepAll())
  want = reference_logits(cfg, weights, tokens)
  got = np.asarray(logits[0], np.float64)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_bfloat16_compute_stays_close_to_float32():
  cfg = tiny_config()
  weights = tiny_weights(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 24)))
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = from_weights(cfg, weights, dtype)
    graphdef, params = nnx.split(model)
    cache = init_cache(cfg, 1, 32, dtype)
    logits, _ = steps.forward(graphdef, params, cache, tokens, jnp.array([24]),
                              policy=KeepAll())
    out[dtype] = np.asarray(logits, np.float64)
  rel = (np.linalg.norm(out[jnp.bfloat16] - out[jnp.float32])
         / np.linalg.norm(out[jnp.float32]))
  assert rel < 3e-2, rel
