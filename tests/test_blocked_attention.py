"""Blocked (online-softmax) attention equals dense attention over the same slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.models import attention
from lmcache_jax.models.blocked_attention import blocked_attend, block_size_for


def random_case(seed, batch=2, steps=5, num_kv=2, group=3, capacity=512,
                head_dim=16, scatter=False):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, steps, num_kv * group, head_dim))
  keys = rng.standard_normal((batch, num_kv, capacity, head_dim))
  values = rng.standard_normal((batch, num_kv, capacity, head_dim))
  lengths = rng.integers(steps, capacity // 2, size=batch)
  positions = np.full((batch, num_kv, capacity), -1)
  q_pos = np.full((batch, steps), -1)
  for b, n in enumerate(lengths):
    slots = (rng.permutation(capacity)[:n] if scatter else np.arange(n))
    for h in range(num_kv):
      positions[b, h, slots] = np.arange(n)
    real = rng.integers(1, steps + 1)  # ragged: some queries are padding
    q_pos[b, :real] = np.arange(n - real, n)
  weights = (q_pos >= 0).astype(np.float32) * rng.random((batch, steps))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (f32(q), f32(keys), f32(values), jnp.asarray(positions, jnp.int32),
          jnp.asarray(q_pos, jnp.int32), f32(weights))


@pytest.mark.parametrize("seed,scatter", [(0, False), (1, True), (2, False)])
@pytest.mark.parametrize("block", [128, 256])
def test_blocked_matches_dense(seed, scatter, block):
  q, keys, values, positions, q_pos, weights = random_case(seed, scatter=scatter)
  want_out, want_mass = attention._attend_dense(q, keys, values, positions,
                                                q_pos, weights)
  out, mass = blocked_attend(q, keys, values, positions, q_pos, weights,
                             block=block, with_mass=True,
                             precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mass, want_mass, rtol=1e-5, atol=1e-6)


def test_without_mass_returns_zeros():
  q, keys, values, positions, q_pos, weights = random_case(3)
  _, mass = blocked_attend(q, keys, values, positions, q_pos, weights,
                           block=128, with_mass=False,
                           precision=jax.lax.Precision.HIGHEST)
  assert not np.any(np.asarray(mass))


def test_block_size_choice():
  assert block_size_for(4096) == 512
  assert block_size_for(384) == 128
  assert block_size_for(200) is None      # no block divides it: stay dense
  assert block_size_for(256) == 128
