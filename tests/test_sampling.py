"""Sampling: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.engine.sampling import Sampling, sample


def draws(logits, sampling, n=400):
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.vmap(lambda k: sample(logits, k, sampling))(keys))


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(1), (4, 50))
  np.testing.assert_array_equal(sample(logits, jax.random.key(0), Sampling()),
                                np.argmax(logits, axis=-1))


def test_top_k_restricts_support():
  logits = jnp.array([[0.0, 3.0, 2.9, 1.0, 2.8]])
  seen = set(draws(logits, Sampling(temperature=5.0, top_k=3))[:, 0])
  assert seen == {1, 2, 4}


def test_top_p_keeps_smallest_prefix_reaching_mass():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None]
  assert set(draws(logits, Sampling(temperature=1.0, top_p=0.75))[:, 0]) == {0, 1}
  assert set(draws(logits, Sampling(temperature=1.0, top_p=0.1))[:, 0]) == {0}


def test_temperature_one_follows_the_distribution():
  probs = np.array([0.6, 0.3, 0.1])
  logits = jnp.log(jnp.asarray(probs))[None]
  counts = np.bincount(draws(logits, Sampling(temperature=1.0), 4000)[:, 0],
                       minlength=3) / 4000
  np.testing.assert_allclose(counts, probs, atol=0.03)


def test_same_key_same_tokens():
  logits = jax.random.normal(jax.random.key(2), (3, 100))
  s = Sampling(temperature=0.8, top_k=20, top_p=0.9)
  np.testing.assert_array_equal(sample(logits, jax.random.key(7), s),
                                sample(logits, jax.random.key(7), s))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Sampling(**kwargs)
