"""Predictions from a cache holding errors, against the float64 reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config, tiny_weights
from lmcache_jax.engine.divergence import head_divergence, log_probs
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from reference_model import reference_logits

CFG = tiny_config()
WEIGHTS = tiny_weights(CFG, seed=4)
TOKENS = np.random.default_rng(5).integers(0, CFG.vocab_size, 20)
SHAPE = (CFG.num_layers, len(TOKENS), CFG.num_kv_heads, CFG.head_dim)


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, WEIGHTS, jnp.float32))


def reference_log_probs(key_error=None, value_error=None, residual=0,
                        sinks=0) -> np.ndarray:
  logits = reference_logits(CFG, WEIGHTS, TOKENS, key_error, value_error,
                            residual, sinks)[:-1]
  logits = logits - logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize("residual,sinks", [(0, 0), (3, 2)])
def test_log_probs_match_float64_reference(lm, residual, sinks):
  rng = np.random.default_rng(6)
  dk, dv = (0.3 * rng.standard_normal(SHAPE) for _ in range(2))
  model = nnx.merge(lm.graphdef, lm.params)
  got = log_probs(model, jnp.asarray(TOKENS), jnp.asarray(dk, jnp.float32),
                  jnp.asarray(dv, jnp.float32), residual=residual,
                  sinks=sinks)
  want = reference_log_probs(dk, dv, residual, sinks)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # the errors change the predictions (beyond the tolerance above)
  assert np.abs(want - reference_log_probs()).max() > 1e-2


def test_head_divergence_is_each_head_alone(lm):
  rng = np.random.default_rng(7)
  widths, residual, sinks = 2, 3, 2
  # errors [W, L, K, T, Hd]; the second candidate is none at all
  keys = 0.3 * rng.standard_normal((widths, *np.moveaxis(np.zeros(SHAPE),
                                                         2, 1).shape))
  values = 0.3 * rng.standard_normal(keys.shape)
  keys[1] = values[1] = 0.0
  kl = head_divergence(lm, TOKENS, keys, values, residual=residual,
                       sinks=sinks)
  assert kl.shape == (CFG.num_layers, CFG.num_kv_heads, widths)
  np.testing.assert_allclose(kl[..., 1], 0.0, atol=1e-5)
  exact = reference_log_probs(residual=residual, sinks=sinks)
  for layer, head in [(0, 1), (2, 0)]:
    dk, dv = np.zeros(SHAPE), np.zeros(SHAPE)
    dk[layer, :, head] = keys[0, layer, head]
    dv[layer, :, head] = values[0, layer, head]
    got = reference_log_probs(dk, dv, residual, sinks)
    want = float(np.sum(np.exp(exact) * (exact - got)))
    assert want > 1e-3
    assert kl[layer, head, 0] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("sinks", [0, 3])
def test_divergence_needs_a_far_read(lm, sinks):
  errors = 0.3 * np.random.default_rng(8).standard_normal(
      (1, CFG.num_layers, CFG.num_kv_heads, len(TOKENS), CFG.head_dim))
  # the last scored query (position T - 2) reads token `sinks` beyond a
  # window of T - 2 - sinks tokens, and nothing beyond one token more
  edge = len(TOKENS) - 2 - sinks
  kl = lambda residual: head_divergence(lm, TOKENS, errors, errors,
                                        residual=residual, sinks=sinks)
  assert kl(edge).max() > 1e-6
  np.testing.assert_array_equal(kl(edge + 1), 0.0)


def test_errors_must_cover_the_tokens(lm):
  errors = np.zeros((1, CFG.num_layers, CFG.num_kv_heads, 5, CFG.head_dim))
  with pytest.raises(ValueError, match="got 20 tokens, errors for 5"):
    head_divergence(lm, TOKENS, errors, errors)
