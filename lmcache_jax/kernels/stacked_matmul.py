"""A few rows times one layer of layer-stacked weights, read in place.

Decode multiplies a handful of rows (one per sequence) by every weight
matrix: the step is bound by reading the weights. Slicing layer ``l`` out of
a stacked [L, K, N] parameter inside the model's scan makes XLA copy the
slice before its matmul, which triples the bytes a step moves; this kernel
reads the slice where it lies. Weights that share an input (q, k and v; gate
and up) go through one call: one launch and one sum of partials instead of
one per weight.

Contract: x [M, K] (M at most 16) and weights [L, K, N_i] in one 16-bit
dtype; returns x @ concat_i(w_i[layer]) [M, sum N_i] float32, accumulated in
float32 on tensor cores. Programs tile the output columns and split K; their
partial sums are added after.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose

MAX_ROWS = 16     # rows of one tensor-core tile: x is padded to it


def _kernel(layer_ref, x_ref, *refs, block_n: int, block_k: int, steps: int,
            starts: tuple[int, ...]):
  *w_refs, out_ref = refs
  layer = layer_ref[0]
  column = pl.program_id(0)   # output column block; weight i owns those
  first = pl.program_id(1) * steps   # from starts[i] to the next start
  ends = starts[1:] + (pl.num_programs(0),)
  for w_ref, start, end in zip(w_refs, starts, ends):

    @pl.when((column >= start) & (column < end))
    def _(w_ref=w_ref, start=start):
      cols = pl.ds((column - start) * block_n, block_n)

      def body(i, acc):
        k = pl.ds((first + i) * block_k, block_k)
        return acc + plgpu.dot(x_ref[:, k], w_ref[layer, k, cols])

      out_ref[...] = jax.lax.fori_loop(
          0, steps, body, jnp.zeros(out_ref.shape, jnp.float32))


def stacked_matmul_reference(x, w, layer, **unused):
  del unused
  ws = w if isinstance(w, (tuple, list)) else (w,)
  w = jnp.concatenate([jax.lax.dynamic_index_in_dim(wi, layer, keepdims=False)
                       for wi in ws], axis=-1)
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
  """x @ w[layer] in float32 (``w`` a tuple: the products side by side).

  Args:
    x: [M, K] rows, M <= 16, w's dtype.
    w: [L, K, N] the stacked weight, or a tuple of them (same L and K).
    layer: int32 scalar.
    block_n, block_k: tile of w a program reads per step (powers of two;
      lowered to divide every N and K).
    splits: programs along K; None = enough for about 1,024 programs.
    interpret: Pallas interpret mode (CPU tests).
  """
  ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
  rows, depth = x.shape
  if rows > MAX_ROWS:
    raise ValueError(f"stacked_matmul takes at most {MAX_ROWS} rows, got {rows}")
  if len({wi.shape[:2] for wi in ws}) != 1 or ws[0].shape[1] != depth:
    raise ValueError(f"stacked_matmul needs weights [L, {depth}, N] with one L, "
                     f"got {[wi.shape for wi in ws]}")
  backend = choose("stacked_matmul", interpret)
  if backend == "reference":
    return stacked_matmul_reference(x, ws, layer)
  widths = [wi.shape[-1] for wi in ws]
  block_n = _largest_block(math.gcd(*widths), block_n)
  block_k = _largest_block(depth, block_k)
  blocks_k = depth // block_k
  columns = [n // block_n for n in widths]
  starts = tuple(sum(columns[:i]) for i in range(len(ws)))
  if splits is None:
    splits = max(1, min(blocks_k, 1024 // sum(columns)))
  while blocks_k % splits:
    splits -= 1
  x = jnp.pad(x, ((0, MAX_ROWS - rows), (0, 0)))
  whole = lambda a: pl.BlockSpec(a.shape, lambda n, s: (0,) * a.ndim)  # noqa: E731
  partial = pl.pallas_call(
      functools.partial(_kernel, block_n=block_n, block_k=block_k,
                        steps=blocks_k // splits, starts=starts),
      grid=(sum(columns), splits),
      in_specs=[pl.BlockSpec((1,), lambda n, s: (0,)), whole(x),
                *(whole(wi) for wi in ws)],
      out_specs=pl.BlockSpec((None, MAX_ROWS, block_n), lambda n, s: (s, 0, n)),
      out_shape=jax.ShapeDtypeStruct((splits, MAX_ROWS, sum(widths)),
                                     jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=backend == "interpret",
  )(jnp.asarray(layer, jnp.int32).reshape(1), x, *ws)
  return jnp.sum(partial, axis=0)[:rows]
