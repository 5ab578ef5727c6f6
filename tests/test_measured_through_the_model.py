"""Calibration and the divergence measurement run the model's own modules.

A change of the layer math in ``models.llama`` alone (here every RMSNorm
scaling by 1 + weight, as Gemma's do) must reach what calibration collects
and what the divergence measurement costs, so that neither can measure a
model other than the one that serves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config, tiny_weights
from lmcache_jax.arch.rope import apply_rope, inverse_frequencies
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import calibration, steps
from lmcache_jax.engine.divergence import head_divergence, log_probs
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.models import llama
from lmcache_jax.models.loaded import LoadedModel
from reference_model import reference_logits

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
WEIGHTS = tiny_weights(CFG, seed=9)
TOKENS = np.random.default_rng(10).integers(0, CFG.vocab_size, 20)


@pytest.fixture
def offset_norms(monkeypatch):
  """The model's RMSNorms scale by 1 + weight instead of the weight.
  Compiled programs hold the math they were traced with, so they are
  dropped when the change comes and when it goes."""
  plain = llama.rms_norm
  monkeypatch.setattr(llama, "rms_norm",
                      lambda x, weight, eps: plain(x, 1 + weight, eps))
  jax.clear_caches()
  yield
  monkeypatch.undo()
  jax.clear_caches()


@pytest.fixture
def lm():
  return LoadedModel.from_module(llama.from_weights(CFG, WEIGHTS,
                                                    jnp.float32))


def first_layer_queries(norm_scale) -> np.ndarray:
  """Layer 0's rotated queries [N, T, Hd] of TOKENS, by hand, with the
  attention norm's weight w entering as ``norm_scale(w)``."""
  x = WEIGHTS["embed"][TOKENS].astype(np.float64)
  h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.norm_eps)
  h = h * norm_scale(WEIGHTS["layers.attn_norm"][0])
  q = (h @ WEIGHTS["layers.q"][0]).reshape(len(TOKENS), CFG.num_heads,
                                           CFG.head_dim)
  q = apply_rope(jnp.asarray(q, jnp.float32), jnp.arange(len(TOKENS)),
                 inverse_frequencies(CFG))
  return np.swapaxes(np.asarray(q), 0, 1)


def test_calibration_collects_the_models_layers(offset_norms, lm):
  acts = calibration.collect(lm, TOKENS)
  # queries: layer 0's by hand under the changed norm, not the plain one
  want = first_layer_queries(lambda w: 1 + w)
  np.testing.assert_allclose(acts.queries[0], want, rtol=1e-4, atol=1e-5)
  assert np.abs(want - first_layer_queries(lambda w: w)).max() > 0.5
  # keys and values: what the model's own prefill writes in its cache
  _, cache = prefill(lm, init_cache(CFG, 1, len(TOKENS), jnp.float32),
                     [list(TOKENS)], KeepAll())
  np.testing.assert_allclose(acts.keys_rope, np.asarray(cache.keys[:, 0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts.values, np.asarray(cache.values[:, 0]),
                             rtol=1e-5, atol=1e-5)
  # and the keys before RoPE are the same keys, unrotated
  rotated = apply_rope(jnp.asarray(np.swapaxes(acts.keys, 1, 2)),
                       jnp.arange(len(TOKENS)), inverse_frequencies(CFG))
  np.testing.assert_allclose(np.swapaxes(np.asarray(rotated), 1, 2),
                             acts.keys_rope, rtol=1e-5, atol=1e-5)


def served_log_probs(lm) -> np.ndarray:
  """Next-token log-probabilities [T - 1, V] of the model's own forward."""
  logits, _ = steps.forward(lm.graphdef, lm.params,
                            init_cache(CFG, 1, len(TOKENS), jnp.float32),
                            jnp.asarray(TOKENS[None]),
                            jnp.array([len(TOKENS)]), policy=KeepAll())
  return np.asarray(jax.nn.log_softmax(logits[0, :-1], axis=-1))


def test_divergence_costs_the_models_layers(offset_norms, lm):
  served = served_log_probs(lm)
  plain = reference_logits(CFG, WEIGHTS, TOKENS)[:-1]   # float64, plain norms
  plain = plain - plain.max(-1, keepdims=True)
  plain = plain - np.log(np.exp(plain).sum(-1, keepdims=True))
  assert np.abs(served - plain).max() > 0.1
  model = nnx.merge(lm.graphdef, lm.params)
  shape = (CFG.num_layers, len(TOKENS), CFG.num_kv_heads, CFG.head_dim)
  zero = jnp.zeros(shape, jnp.float32)
  exact = np.asarray(log_probs(model, jnp.asarray(TOKENS), zero, zero,
                               residual=0, sinks=0))
  np.testing.assert_allclose(exact, served, atol=2e-5)
  # each cost is the KL from the served predictions of those with that
  # head's errors alone
  rng = np.random.default_rng(11)
  errors = 0.3 * rng.standard_normal((1, CFG.num_layers, CFG.num_kv_heads,
                                      len(TOKENS), CFG.head_dim))
  kl = head_divergence(lm, TOKENS, errors, errors, residual=3, sinks=2)
  layer, head = 1, 2
  dk = np.zeros(shape, np.float32)
  dk[layer, :, head] = errors[0, layer, head]
  got = np.asarray(log_probs(model, jnp.asarray(TOKENS), jnp.asarray(dk),
                             jnp.asarray(dk), residual=3, sinks=2))
  want = float(np.sum(np.exp(served) * (served - got)))
  assert want > 1e-3
  assert kl[layer, head, 0] == pytest.approx(want, rel=1e-3)
