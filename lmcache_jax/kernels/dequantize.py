"""Unpack + dequantize: packed rows → float rows [N, Hd].

``ChunkReader`` is the unpacking step: it yields the codes of ``chunk``
contiguous channels at a time with whole-word loads and one shift per plane
(``numerics.formats``' planar layout).
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


class ChunkReader:
  """Reads int32 codes [rows, chunk] of channels [c*chunk, (c+1)*chunk)."""

  def __init__(self, words_ref, fmt: Format, head_dim: int, rows=slice(None)):
    self.words_ref = words_ref
    self.rows = rows
    self.fmt = fmt
    self.head_dim = head_dim
    self.chunk = fmt.chunk(head_dim)
    self._loaded = {}

  def _load(self, start: int, width: int):
    if (start, width) not in self._loaded:
      self._loaded[(start, width)] = self.words_ref[self.rows,
                                                    pl.ds(start, width)]
    return self._loaded[(start, width)]

  def codes(self, c: int) -> jax.Array:
    first = c * self.chunk
    code, start, low = None, 0, 0
    for p in self.fmt.planes:
      width = self.head_dim * p // 32
      # channel d of this plane: word d % width, bits p * (d // width)
      word = self._load(start + first % width, self.chunk)
      sub = ((word >> (p * (first // width))) & ((1 << p) - 1)) << low
      code = sub if code is None else code | sub
      start += width
      low += p
    return code.astype(jnp.int32)

  def num_chunks(self) -> int:
    return self.head_dim // self.chunk


def _kernel(words_ref, scale_ref, zero_ref, out_ref, *, fmt: Format,
            group_size: int):
  # words_ref [bn, W]; scale_ref, zero_ref [bn, Hd/g]; out_ref [bn, Hd]
  head_dim = out_ref.shape[-1]
  reader = ChunkReader(words_ref, fmt, head_dim)
  for c in range(reader.num_chunks()):
    gi = c * reader.chunk // group_size
    scale = scale_ref[:, pl.ds(gi, 1)]
    zero = formats.zero_value(scale, zero_ref[:, pl.ds(gi, 1)], fmt.bits)
    x = reader.codes(c).astype(jnp.float32) * scale.astype(jnp.float32) + zero
    out_ref[:, pl.ds(c * reader.chunk, reader.chunk)] = x.astype(out_ref.dtype)


def _build(rows: int, head_dim: int, fmt: Format, group_size: int, dtype,
           block_rows: int, interpret: bool):
  groups = head_dim // group_size
  words = fmt.words(head_dim)
  row_block = lambda i: (i, 0)
  return pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, group_size=group_size),
      grid=(rows // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, words), row_block),
                pl.BlockSpec((block_rows, groups), row_block),
                pl.BlockSpec((block_rows, groups), row_block)],
      out_specs=pl.BlockSpec((block_rows, head_dim), row_block),
      out_shape=jax.ShapeDtypeStruct((rows, head_dim), dtype),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret)


def unpack_dequantize_reference(payload, scale, zero, *, fmt: Format,
                                group_size: int, head_dim: int,
                                dtype=jnp.float32, block_rows: int = 64,
                                interpret: bool | None = None):
  del block_rows, interpret
  return schemes.dequantize(payload, scale, zero, fmt, group_size, head_dim,
                            dtype)


@functools.partial(jax.jit, static_argnames=(
    "fmt", "group_size", "head_dim", "dtype", "block_rows", "interpret"))
def unpack_dequantize(payload, scale, zero, *, fmt: Format, group_size: int,
                      head_dim: int, dtype=jnp.float32, block_rows: int = 64,
                      interpret: bool | None = None):
  """Dense rows [..., Hd] from packed codes and their scales.

  Args:
    payload: uint32 words [..., Hd*bits/32] (int formats) or float8 [..., Hd].
    scale, zero: float16 scales and uint8 zero codes [..., Hd/g] (zero None
      for fp8; ``numerics.schemes``).
    fmt, group_size, head_dim: as quantized.
    dtype: output dtype.
    block_rows: rows per program; interpret: Pallas interpret mode.
  """
  fmt.check(head_dim, group_size)
  backend = choose("unpack_dequantize", interpret, fmt)
  if backend == "reference":
    return schemes.dequantize(payload, scale, zero, fmt, group_size, head_dim,
                              dtype)
  lead = payload.shape[:-1]
  rows = max(1, int(jnp.size(payload) // payload.shape[-1]))
  block = min(floor_pow2(block_rows), next_pow2(rows))
  padded = -(-rows // block) * block
  pad = lambda a: jnp.pad(a.reshape(rows, -1), ((0, padded - rows), (0, 0)))
  out = _build(padded, head_dim, fmt, group_size, jnp.dtype(dtype), block,
               backend == "interpret")(pad(payload), pad(scale), pad(zero))
  return out[:rows].reshape(*lead, head_dim)
