"""A few rows times one layer of a layer-stacked weight, read in place.

Decode multiplies a handful of rows (one per sequence) by every weight
matrix: the step is bound by reading the weights. Slicing layer ``l`` out of
a stacked [L, K, N] parameter inside the model's scan makes XLA copy the
slice before its matmul, which triples the bytes a step moves; this kernel
reads the slice where it lies.

Contract: x [M, K] (M at most 16) and w [L, K, N] in one 16-bit dtype;
returns x @ w[layer] [M, N] float32, accumulated in float32 on tensor cores.
Programs tile N and split K; their partial sums are added after.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose

MAX_ROWS = 16     # rows of one tensor-core tile: x is padded to it


def _kernel(layer_ref, x_ref, w_ref, out_ref, *, block_k: int, steps: int):
  layer = layer_ref[0]
  first = pl.program_id(1) * steps

  def body(i, acc):
    k = pl.ds((first + i) * block_k, block_k)
    return acc + plgpu.dot(x_ref[:, k], w_ref[layer, k, :])

  out_ref[...] = jax.lax.fori_loop(
      0, steps, body, jnp.zeros(out_ref.shape, jnp.float32))


def stacked_matmul_reference(x, w, layer, **unused):
  del unused
  w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _largest_block(n: int, largest: int) -> int:
  block = largest
  while n % block:
    block //= 2
  return block


@functools.partial(jax.jit, static_argnames=(
    "block_n", "block_k", "splits", "num_warps", "num_stages", "interpret"))
def stacked_matmul(x, w, layer, *, block_n: int = 64, block_k: int = 256,
                   splits: int | None = None, num_warps: int = 4,
                   num_stages: int = 4, interpret: bool | None = None):
  """x @ w[layer] in float32.

  Args:
    x: [M, K] rows, M <= 16, w's dtype.
    w: [L, K, N] the stacked weight.
    layer: int32 scalar.
    block_n, block_k: tile of w a program reads per step (powers of two;
      lowered to divide N and K).
    splits: programs along K; None = enough for about 1,024 programs.
    interpret: Pallas interpret mode (CPU tests).
  """
  rows, depth = x.shape
  num_layers, _, width = w.shape
  if rows > MAX_ROWS:
    raise ValueError(f"stacked_matmul takes at most {MAX_ROWS} rows, got {rows}")
  backend = choose("stacked_matmul", interpret)
  if backend == "reference":
    return stacked_matmul_reference(x, w, layer)
  block_n = _largest_block(width, block_n)
  block_k = _largest_block(depth, block_k)
  blocks_k = depth // block_k
  if splits is None:
    splits = max(1, min(blocks_k, 1024 // (width // block_n)))
  while blocks_k % splits:
    splits -= 1
  x = jnp.pad(x, ((0, MAX_ROWS - rows), (0, 0)))
  partial = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, steps=blocks_k // splits),
      grid=(width // block_n, splits),
      in_specs=[pl.BlockSpec((1,), lambda n, s: (0,)),
                pl.BlockSpec((MAX_ROWS, depth), lambda n, s: (0, 0)),
                pl.BlockSpec((num_layers, depth, block_n),
                             lambda n, s: (0, 0, n))],
      out_specs=pl.BlockSpec((None, MAX_ROWS, block_n), lambda n, s: (s, 0, n)),
      out_shape=jax.ShapeDtypeStruct((splits, MAX_ROWS, width), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=backend == "interpret",
  )(jnp.asarray(layer, jnp.int32).reshape(1), x, w)
  return jnp.sum(partial, axis=0)[:rows]
