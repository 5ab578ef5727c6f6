"""The attention op's fast paths equal the reference attention over written slots.

Caches hold earlier tokens in scattered slots with holes (as after eviction),
batches are ragged, and the stacked cache is written in place.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax import attention
from lmcache_jax.cache.step import Step
from lmcache_jax.kernels.backend import interpret_mode

LAYERS, BATCH, KV, GROUP, SLOTS, DIM = 2, 2, 2, 3, 64, 16
pytestmark = pytest.mark.gpu   # python -m pytest -m gpu -n 0, on a GPU
ON_GPU = jax.default_backend() == "gpu"


def kernels():
  """Pallas kernels lowered for the GPU there, interpreted elsewhere."""
  return contextlib.nullcontext() if ON_GPU else interpret_mode()


def as_f32(tree):
  return jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, tree)


def scattered_cache(rng, lengths, dtype=jnp.float32):
  """A stacked cache whose rows hold positions [0, length) in random slots,
  a few of them evicted."""
  shape = (LAYERS, BATCH, KV, SLOTS)
  positions = np.full(shape, -1, np.int32)
  for index in np.ndindex(LAYERS, BATCH, KV):
    n = lengths[index[1]]
    slots = rng.permutation(SLOTS)[:n]
    positions[index][slots] = np.arange(n)
    positions[index][rng.choice(slots, min(n, 3), replace=False)] = -1
  kv = lambda: jnp.asarray(rng.standard_normal((*shape, DIM)), dtype)  # noqa: E731
  return attention.LayerKV(kv(), kv(), jnp.asarray(positions),
                           jnp.asarray(rng.random(shape), jnp.float32))


def step_for(rng, stacked, lengths, num_new, steps, window=None):
  """Positions continuing each row, the lowest free slots, query weights
  (every real query, or the last ``window``)."""
  t = np.arange(steps)
  positions = np.where(t[None] < num_new[:, None], lengths[:, None] + t[None], -1)
  free = np.asarray(stacked.positions) < 0
  order = np.argsort(~free, axis=-1, kind="stable")[..., :steps]
  slots = np.where(t < num_new[None, :, None, None], order, SLOTS)
  real = positions >= 0
  if window is not None:
    real &= t[None] >= num_new[:, None] - window
  weights = real * rng.random(positions.shape)
  return Step(jnp.asarray(positions, jnp.int32),
              jnp.asarray(np.maximum(positions, 0), jnp.int32),
              jnp.asarray(slots, jnp.int32), jnp.asarray(weights, jnp.float32))


def reference(q, k, v, stacked, layer, step):
  written = attention.write_stacked(stacked, layer, k, v, step.positions,
                                    step.slots[layer])
  out, mass = attention.attend_slots(q, attention.layer_of(written, layer),
                                     step.positions, step.query_weights)
  return out, written, mass


def fresh(rng, steps, dtype=jnp.float32):
  draw = lambda h: jnp.asarray(rng.standard_normal((BATCH, steps, h, DIM)), dtype)  # noqa: E731
  return draw(KV * GROUP), draw(KV), draw(KV)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("mass_queries,window", [(0, None), (None, None), (4, 4)])
def test_prefill_matches_reference(seed, empty, mass_queries, window):
  rng = np.random.default_rng(seed)
  lengths = np.zeros(BATCH, int) if empty else rng.integers(5, 30, BATCH)
  num_new = np.array([12, 7])
  stacked = scattered_cache(rng, lengths)
  step = step_for(rng, stacked, lengths, num_new, 12, window)
  q, k, v = fresh(rng, 12)
  layer = jnp.int32(1)
  request = attention.Request(empty_cache=empty, mass_queries=mass_queries)
  got = jax.jit(attention.attend, static_argnums=6)(
      q, k, v, stacked, layer, step._replace(slots=step.slots[1]), request)
  want = reference(q, k, v, stacked, 1, step)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_array_equal(a, b)
  if mass_queries == 0:
    assert got[2] is None
  else:
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_kernel_reads_the_stacked_cache_in_place(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 50, BATCH)
  stacked = scattered_cache(rng, lengths, jnp.bfloat16)
  step = step_for(rng, stacked, lengths, np.array([1, 0]), 1)   # row 1 padding
  q, k, v = fresh(rng, 1, jnp.bfloat16)
  with kernels():
    out, written, mass = jax.jit(attention.attend)(
        q, k, v, stacked, jnp.int32(0), step._replace(slots=step.slots[0]))
  want, want_written, _ = reference(*as_f32((q, k, v, stacked)), 0, step)
  assert mass is None
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
  assert not np.any(np.asarray(out[1], np.float32))          # padding query
  for a, b in zip(jax.tree.leaves(as_f32(written)), jax.tree.leaves(want_written)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not ON_GPU, reason="bfloat16 flash attention (cuDNN) runs on GPUs")
@pytest.mark.parametrize("empty", [False, True])
def test_bfloat16_prefill_on_the_gpu(empty):
  rng = np.random.default_rng(7)
  lengths = np.zeros(BATCH, int) if empty else rng.integers(5, 30, BATCH)
  stacked = scattered_cache(rng, lengths, jnp.bfloat16)
  step = step_for(rng, stacked, lengths, np.array([12, 7]), 12)
  q, k, v = fresh(rng, 12, jnp.bfloat16)
  request = attention.Request(empty_cache=empty, mass_queries=None)
  out, _, mass = jax.jit(attention.attend, static_argnums=6)(
      q, k, v, stacked, jnp.int32(1), step._replace(slots=step.slots[1]),
      request)
  want, _, want_mass = reference(*as_f32((q, k, v, stacked)), 1, step)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2,
                             atol=2e-2)
  np.testing.assert_allclose(mass, want_mass, rtol=2e-2, atol=2e-2)
