"""Quantize + pack: float rows [N, Hd] → uint32 codes, float16 scales, uint8 zero codes.

The layout is ``numerics.formats``' planar packing; the math is
``numerics.schemes.quantize`` (its reference here). One program handles
``block_rows`` rows; every group, chunk and plane is unrolled at trace time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmcache_jax.kernels.backend import choose, floor_pow2, next_pow2
from lmcache_jax.numerics import formats, schemes
from lmcache_jax.numerics.formats import Format


def _kernel(x_ref, words_ref, scale_ref, zero_ref, *, fmt: Format,
            group_size: int):
  # x_ref [bn, Hd]; words_ref [bn, W]; scale_ref, zero_ref [bn, Hd/g]
  head_dim = x_ref.shape[-1]
  levels = float((1 << fmt.bits) - 1)
  zeros, invs = [], []
  for gi in range(head_dim // group_size):
    xg = x_ref[:, pl.ds(gi * group_size, group_size)].astype(jnp.float32)
    scale, code = formats.grid(jnp.min(xg, axis=1), jnp.max(xg, axis=1),
                               fmt.bits)
    s = scale.astype(jnp.float32)
    zero_ref[:, pl.ds(gi, 1)] = code.astype(jnp.int32).astype(jnp.uint8)[:, None]
    scale_ref[:, pl.ds(gi, 1)] = scale[:, None]
    zeros.append(formats.zero_value(scale, code, fmt.bits)[:, None])
    invs.append(jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)[:, None])
  start, low = 0, 0
  for p in fmt.planes:
    width = head_dim * p // 32
    word = jnp.zeros((x_ref.shape[0], width), jnp.uint32)
    for i in range(32 // p):
      gi = i * width // group_size
      xc = x_ref[:, pl.ds(i * width, width)].astype(jnp.float32)
      u = (xc - zeros[gi]) * invs[gi]
      code = jnp.clip(jnp.floor(u + 0.5), 0.0, levels).astype(jnp.int32)
      sub = (code.astype(jnp.uint32) >> low) & ((1 << p) - 1)
      word = word | (sub << (p * i))
    words_ref[:, pl.ds(start, width)] = word
    start += width
    low += p


def _build(rows: int, head_dim: int, fmt: Format, group_size: int,
           block_rows: int, interpret: bool):
  groups = head_dim // group_size
  words = fmt.words(head_dim)
  return pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, group_size=group_size),
      grid=(rows // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, head_dim), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((block_rows, words), lambda i: (i, 0)),
                 pl.BlockSpec((block_rows, groups), lambda i: (i, 0)),
                 pl.BlockSpec((block_rows, groups), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((rows, words), jnp.uint32),
                 jax.ShapeDtypeStruct((rows, groups), jnp.float16),
                 jax.ShapeDtypeStruct((rows, groups), jnp.uint8)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret)


def quantize_pack_reference(x: jax.Array, *, fmt: Format, group_size: int,
                            block_rows: int = 64, interpret: bool | None = None):
  del block_rows, interpret
  return schemes.quantize(x, fmt, group_size)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_rows",
                                             "interpret"))
def quantize_pack(x: jax.Array, *, fmt: Format, group_size: int,
                  block_rows: int = 64, interpret: bool | None = None):
  """Quantizes each row of x [..., Hd] and packs its codes.

  Args:
    x: float rows; leading axes are flattened.
    fmt: an int format (``numerics.formats``); fp8 needs no packing and runs
      ``schemes.quantize`` directly.
    group_size: channels per scale/zero; ``fmt.check`` validates it.
    block_rows: rows per program (rounded down to a power of two ≥ 1).
    interpret: run the Pallas kernel in interpret mode (CPU tests).

  Returns:
    words [..., Hd*bits/32] uint32, scale [..., Hd/g] float16 and zero
    code [..., Hd/g] uint8 (``numerics.schemes``).
  """
  head_dim = x.shape[-1]
  fmt.check(head_dim, group_size)
  backend = choose("quantize_pack", interpret, fmt)
  if backend == "reference":
    return schemes.quantize(x, fmt, group_size)
  lead = x.shape[:-1]
  flat = x.reshape(-1, head_dim)
  rows = flat.shape[0]
  block = min(floor_pow2(block_rows), next_pow2(rows))
  padded = -(-rows // block) * block
  flat = jnp.pad(flat, ((0, padded - rows), (0, 0)))
  words, scale, zero = _build(padded, head_dim, fmt, group_size, block,
                              backend == "interpret")(flat)
  return (words[:rows].reshape(*lead, -1), scale[:rows].reshape(*lead, -1),
          zero[:rows].reshape(*lead, -1))
