"""The kernels that read one layer of a layer-stacked array in place, against
their references: interpreted on the CPU, lowered on a GPU."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.kernels.backend import interpret_mode
from lmcache_jax.kernels.stacked_decode import (block_for, stacked_decode_attention,
                                                stacked_decode_attention_reference)
from lmcache_jax.kernels.stacked_matmul import (stacked_matmul,
                                                stacked_matmul_reference)

pytestmark = pytest.mark.gpu   # python -m pytest -m gpu -n 0, on a GPU
ON_GPU = jax.default_backend() == "gpu"
# float32 runs exactly in interpret mode; the GPU kernels take 16-bit inputs
DTYPE, TOL = (jnp.bfloat16, 2e-2) if ON_GPU else (jnp.float32, 1e-5)


def kernels():
  return contextlib.nullcontext() if ON_GPU else interpret_mode()


@pytest.mark.parametrize("rows,depth,width", [(1, 64, 48), (5, 96, 80),
                                              (16, 256, 128)])
def test_stacked_matmul(rows, depth, width):
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.standard_normal((rows, depth)), DTYPE)
  w = jnp.asarray(rng.standard_normal((3, depth, width)) / np.sqrt(depth), DTYPE)
  with kernels():
    got = stacked_matmul(x, w, jnp.int32(2), block_n=16, block_k=32)
  want = stacked_matmul_reference(x, w, 2)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_stacked_matmul_of_weights_side_by_side():
  """q, k and v (or gate and up) in one call: the products side by side."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((3, 64)), DTYPE)
  ws = tuple(jnp.asarray(rng.standard_normal((2, 64, n)) / 8, DTYPE)
             for n in (96, 32, 32))
  with kernels():
    got = stacked_matmul(x, ws, jnp.int32(1), block_n=64, block_k=16)
  want = jnp.concatenate([stacked_matmul_reference(x, w, 1) for w in ws], -1)
  assert got.shape == (3, 160)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_stacked_matmul_rejects_many_rows():
  with pytest.raises(ValueError, match="at most 16 rows, got 17"):
    stacked_matmul(jnp.zeros((17, 8)), jnp.zeros((1, 8, 8)), 0)


@pytest.mark.parametrize("seed,slots,splits", [(0, 64, 1), (1, 256, 3),
                                               (2, 96, 2)])
def test_stacked_decode_attention(seed, slots, splits):
  """Scattered positions with holes, ragged per row; the limit skips the
  slots past each row's last occupied one."""
  rng = np.random.default_rng(seed)
  layers, batch, kv, group, dim = 3, 2, 2, 3, 16
  shape = (layers, batch, kv, slots)
  keys = jnp.asarray(rng.standard_normal((*shape, dim)), DTYPE)
  values = jnp.asarray(rng.standard_normal((*shape, dim)), DTYPE)
  positions = np.full(shape, -1, np.int32)
  for index in np.ndindex(layers, batch, kv):
    n = rng.integers(1, slots)
    positions[index][rng.permutation(slots)[:n]] = np.arange(n)
  q = jnp.asarray(rng.standard_normal((batch, kv, group, dim)), DTYPE)
  q_pos = jnp.asarray([slots // 3, slots], jnp.int32)
  live = np.asarray(positions[1]) >= 0
  limit = jnp.asarray(np.max(np.where(live, np.arange(1, slots + 1), 0), -1),
                      jnp.int32)
  with kernels():
    out, lse = stacked_decode_attention(
        q, q_pos, jnp.asarray(positions), keys, values, jnp.int32(1), limit,
        block_s=block_for(slots, 32), splits=splits)
  want_out, want_lse = stacked_decode_attention_reference(
      q, q_pos, jnp.asarray(positions), keys, values, 1)
  np.testing.assert_allclose(out, want_out, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(lse, want_lse, rtol=TOL, atol=TOL)
