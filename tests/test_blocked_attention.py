"""Blocked (online-softmax) attention equals dense attention over the same slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.attention.blocked import (block_size_for, blocked_attend,
                                           blocked_mass)
from lmcache_jax.attention.flash import cached_attention
from lmcache_jax.attention.slots import dense_attend


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


def assert_blocked_matches_dense(case, block):
  q, keys, values, positions, q_pos, weights = case
  want_out, want_mass = dense_attend(q, keys, values, positions, q_pos, weights)
  hi = jax.lax.Precision.HIGHEST
  out, lse = blocked_attend(q, keys, values, positions, q_pos, block=block,
                            precision=hi)
  mass = blocked_mass(q, lse, keys, positions, q_pos, weights, block=block,
                      precision=hi)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mass, want_mass, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,scatter", [(0, False), (1, True), (2, False)])
@pytest.mark.parametrize("block", [128, 256])
def test_blocked_matches_dense(seed, scatter, block):
  assert_blocked_matches_dense(random_case(seed, scatter=scatter), block)


@pytest.mark.parametrize("capacity", [300, 600])
def test_a_partial_last_block(capacity):
  block = block_size_for(capacity)
  assert capacity % block
  assert_blocked_matches_dense(random_case(4, capacity=capacity, scatter=True),
                               block)


def test_lse_is_the_log_partition_function():
  q, keys, values, positions, q_pos, _ = random_case(3, scatter=True)
  _, lse = blocked_attend(q, keys, values, positions, q_pos, block=128,
                          precision=jax.lax.Precision.HIGHEST)
  b, t, n = 0, 0, 4
  k = keys[b, n // 3]
  seen = (positions[b, n // 3] >= 0) & (positions[b, n // 3] <= q_pos[b, t])
  logits = (k @ q[b, t, n]) / np.sqrt(q.shape[-1])
  want = jax.scipy.special.logsumexp(jnp.where(seen, logits, -jnp.inf))
  np.testing.assert_allclose(lse[b, t, n], want, rtol=1e-5)


def test_block_size_choice():
  assert block_size_for(4096) == 512
  assert block_size_for(384) == 128
  assert block_size_for(200) is None      # small: stay dense
  assert block_size_for(32832) == 512     # the last block partial
  assert block_size_for(256) == 128


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flash_over_gathered_slots_matches_blocked(seed):
  """The prefill's cached part as flash attention (XLA's implementation here,
  cuDNN on GPUs): occupied slots gathered per kv head, holes and all, one
  head's row empty, ragged queries after every cached token."""
  rng = np.random.default_rng(seed)
  batch, steps, num_kv, group, capacity, dim = 2, 5, 3, 2, 40, 16
  draw = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  q = draw(batch, steps, num_kv * group, dim)
  keys, values = draw(batch, num_kv, capacity, dim), draw(batch, num_kv, capacity, dim)
  positions = np.full((batch, num_kv, capacity), -1, np.int32)
  for b, h in np.ndindex(batch, num_kv):
    n = 0 if (b, h) == (1, 2) else rng.integers(1, capacity)
    positions[b, h, rng.permutation(capacity)[:n]] = np.sort(
        rng.choice(90, n, replace=False))
  q_pos = jnp.asarray([[100, 101, 102, 103, 104], [200, 201, 202, -1, -1]],
                      jnp.int32)
  positions = jnp.asarray(positions)
  out, lse = cached_attention(q, keys, values, positions, q_pos,
                              implementation_name="xla")
  want_out, want_lse = blocked_attend(q, keys, values, positions, q_pos,
                                      block=8, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(out[1, 3:]))            # padding queries
