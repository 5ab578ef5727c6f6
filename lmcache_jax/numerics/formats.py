"""Number formats of the quantized cache: one object per format.

A format says how one head's vector of ``head_dim`` channels is stored, and
carries the hooks everything else calls instead of switching on its name:
``check`` (the shapes it can hold), ``empty`` (its zeroed data leaf),
``quantize`` / ``dequantize`` (the pure-jnp references) and ``round_trip``
(both, without packing). ``kind`` names the kernel family that reads it:
the Pallas kernels (``kernels``) read ``"int"`` formats and run the
reference for the rest. A new format is a new subclass here.

* ``int2``/``int3``/``int4``/``int8`` (``IntFormat``): asymmetric uniform
  codes over groups (the grid arithmetic below), packed densely into uint32
  words: exactly ``head_dim * bits / 32`` words.
* ``fp8`` (``Fp8Format``): float8 e4m3 values with a float16 scale per
  group (symmetric).

Int grids: ``x ≈ code * scale + zero`` with a float16 scale and a uint8
*zero code* per group: ``zero = -scale * levels * zc / 255`` (``levels =
2**bits - 1``), the share of the grid below 0 in 255ths, so a group costs 3
bytes, not 4. The grid always holds 0; rounding the zero moves it by at
most ``scale * levels / 510`` (1/34 of a step at 4 bits). Codes are rounded
half up, ``floor(u + 0.5)``, which every backend computes alike.

Min/max grids (KIVI's per-channel key groups, ``minmax_grid``): ``x ≈ code *
scale + low`` with a float16 scale and a float16 ``low``, the grid spanning
the group's [lo, hi] whether or not it holds 0: a channel's values over a
group of tokens often sit far from 0 (KIVI's outlier channels), where a grid
that must reach 0 would waste most of its levels. 4 bytes per group.

Packing is *planar*: a b-bit code is split into planes of 8, 4, 2 or 1 bits
(3 = 2 + 1). A plane of p bits holds ``W = head_dim * p / 32`` words; channel
``d`` sits in word ``d % W`` at bit ``p * (d // W)``. Unpacking a word block
with one shift yields ``W`` *contiguous* channels, so kernels never interleave
lanes, and a kernel reading a chunk of channels needs only whole-word loads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

_PLANES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclasses.dataclass(frozen=True)
class Format:
  """One storage format; frozen and hashable (a static argument under jit)."""
  name: str
  bits: int
  kind: ClassVar[str]       # the kernel family that reads it
  has_zero: ClassVar[bool]  # an asymmetric grid: a uint8 zero code per group

  def check(self, head_dim: int, group_size: int) -> None:
    """Raises a clear error when the shapes cannot hold this format."""
    if head_dim % group_size:
      raise ValueError(f"group_size={group_size} must divide head_dim="
                       f"{head_dim}; valid: "
                       f"{[g for g in range(1, head_dim + 1) if head_dim % g == 0]}")

  def empty(self, shape: tuple[int, ...], head_dim: int) -> jax.Array:
    """The zeroed data leaf of ``shape`` head vectors."""
    raise NotImplementedError

  def quantize(self, x: jax.Array, group_size: int):
    """x [..., Hd] → (data, scale [..., Hd/g] float16, zero code uint8 or
    None)."""
    raise NotImplementedError

  def dequantize(self, data, scale, zero, group_size: int,
                 head_dim: int) -> jax.Array:
    """float32 [..., Hd]: the inverse of ``quantize`` up to rounding."""
    raise NotImplementedError

  def round_trip(self, x: jax.Array, group_size: int) -> jax.Array:
    """float32 x after quantize and dequantize, for any last-axis length
    the group divides."""
    return self.dequantize(*self.quantize(x, group_size), group_size,
                           x.shape[-1])


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
  """b-bit asymmetric codes, planar-packed into uint32 words."""
  kind: ClassVar[str] = "int"
  has_zero: ClassVar[bool] = True

  @property
  def planes(self) -> tuple[int, ...]:
    return _PLANES[self.bits]

  def words(self, head_dim: int) -> int:
    """uint32 words per head vector."""
    return head_dim * self.bits // 32

  def chunk(self, head_dim: int) -> int:
    """Channels one shift of a word block yields: the narrowest plane's W."""
    return head_dim * min(self.planes) // 32

  def check(self, head_dim: int, group_size: int) -> None:
    super().check(head_dim, group_size)
    if head_dim % 32:
      raise ValueError(f"{self.name} packing needs head_dim to be a multiple "
                       f"of 32, got {head_dim}")
    widest = head_dim * max(self.planes) // 32
    if group_size % widest:
      raise ValueError(
          f"{self.name} with head_dim={head_dim} packs {widest} channels per "
          f"word block, so group_size must be a multiple of {widest}; got "
          f"{group_size}")

  def empty(self, shape, head_dim):
    return jnp.zeros((*shape, self.words(head_dim)), jnp.uint32)

  def quantize(self, x, group_size):
    scale, zero = int_params(x, self.bits, group_size)
    codes = int_codes(x, scale, zero, self.bits, group_size)
    return pack(codes, self), scale, zero

  def dequantize(self, data, scale, zero, group_size, head_dim):
    return from_codes(unpack(data, self, head_dim), scale, zero, self.bits,
                      group_size)

  def round_trip(self, x, group_size):
    scale, zero = int_params(x, self.bits, group_size)
    codes = int_codes(x, scale, zero, self.bits, group_size)
    return from_codes(codes, scale, zero, self.bits, group_size)


@dataclasses.dataclass(frozen=True)
class Fp8Format(Format):
  """float8 e4m3 values, a float16 absmax / 448 scale per group."""
  kind: ClassVar[str] = "fp8"
  has_zero: ClassVar[bool] = False

  def empty(self, shape, head_dim):
    return jnp.zeros((*shape, head_dim), jnp.float8_e4m3fn)

  def quantize(self, x, group_size):
    g = _groups(x.astype(jnp.float32), group_size)
    scale = (jnp.max(jnp.abs(g), axis=-1) / FP8_MAX).astype(jnp.float16)
    s = scale.astype(jnp.float32)[..., None]
    y = jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)
    return y.reshape(x.shape).astype(jnp.float8_e4m3fn), scale, None

  def dequantize(self, data, scale, zero, group_size, head_dim):
    del zero
    y = _groups(data.astype(jnp.float32), group_size)
    return (y * scale.astype(jnp.float32)[..., None]).reshape(
        *data.shape[:-1], head_dim)


FORMATS = {f.name: f for f in (IntFormat("int2", 2), IntFormat("int3", 3),
                               IntFormat("int4", 4), IntFormat("int8", 8),
                               Fp8Format("fp8", 8))}


def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ValueError(f"unsupported KV format {name!r}; valid: "
                     f"{', '.join(FORMATS)}")
  return FORMATS[name]


def format_for_bits(bits) -> IntFormat:
  """``int{bits}`` for bits in 2, 3, 4, 8 (``4.0`` is 4)."""
  if bits not in (2, 3, 4, 8):
    raise ValueError(f"unsupported bit width {bits!r}; valid: 2, 3, 4, 8 "
                     f"(or 16 for an unquantized cache)")
  return FORMATS[f"int{int(bits)}"]


def _groups(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def int_params(x: jnp.ndarray, bits: int, group_size: int):
  """(float16 scale, uint8 zero code) [..., Hd/g] of each group's grid.

  The grid spans [min(lo, 0), max(hi, 0)], so the zero code is in 0..255.
  """
  g = _groups(x.astype(jnp.float32), group_size)
  scale, code = grid(jnp.min(g, axis=-1), jnp.max(g, axis=-1), bits)
  return scale, code.astype(jnp.uint8)


def grid(lo: jnp.ndarray, hi: jnp.ndarray, bits: int):
  """(float16 scale, float32 zero code in 0..255) of the grid over
  [min(lo, 0), max(hi, 0)] (float32 group minima and maxima)."""
  below = -jnp.minimum(lo, 0.0)
  levels = (1 << bits) - 1
  scale = ((jnp.maximum(hi, 0.0) + below) / levels).astype(jnp.float16)
  full = scale.astype(jnp.float32) * levels
  share = jnp.where(full > 0, below / jnp.where(full > 0, full, 1.0), 0.0)
  return scale, jnp.clip(jnp.floor(share * 255 + 0.5), 0.0, 255.0)


def zero_share(bits: int) -> float:
  """The grid offset per unit of zero code, in steps: ``-levels / 255``."""
  return -((1 << bits) - 1) / 255


def zero_value(scale: jnp.ndarray, zero_code: jnp.ndarray,
               bits: int) -> jnp.ndarray:
  """float32 offset of the grid: ``-scale * levels * code / 255``."""
  return (scale.astype(jnp.float32) * zero_code.astype(jnp.float32)
          * zero_share(bits))


def grid_codes(g: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
               bits: int) -> jnp.ndarray:
  """float32 codes of values g [..., Hd/g, n] on each group's grid."""
  s = scale.astype(jnp.float32)[..., None]
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  u = (g - zero_value(scale, zero, bits)[..., None]) * inv
  return jnp.clip(jnp.floor(u + 0.5), 0, (1 << bits) - 1)


def int_codes(x: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
              bits: int, group_size: int) -> jnp.ndarray:
  """uint32 codes [..., Hd] of x on the grid (scale, zero code) [..., Hd/g]."""
  codes = grid_codes(_groups(x.astype(jnp.float32), group_size), scale, zero,
                     bits)
  return codes.reshape(x.shape).astype(jnp.uint32)


def from_codes(codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
               bits: int, group_size: int) -> jnp.ndarray:
  """float32 values [..., Hd] of unpacked codes on their grids [..., Hd/g]."""
  g = _groups(codes.astype(jnp.float32), group_size)
  x = (g * scale.astype(jnp.float32)[..., None]
       + zero_value(scale, zero, bits)[..., None])
  return x.reshape(codes.shape)


def minmax_grid(lo: jnp.ndarray, hi: jnp.ndarray, bits: int):
  """(float16 scale, float16 low) of the grid over [lo, hi] (float32 group
  minima and maxima; lo <= hi). The scale is rounded up, so the float16 grid
  still reaches hi: ``low + levels * scale >= hi`` up to float16 rounding of
  ``low``."""
  levels = (1 << bits) - 1
  low = lo.astype(jnp.float16)
  span = jnp.maximum(hi - low.astype(jnp.float32), 0.0) / levels
  scale = span.astype(jnp.float16)
  short = scale.astype(jnp.float32) < span
  scale = jnp.where(short, jnp.nextafter(scale, jnp.float16(jnp.inf)), scale)
  return scale, low


def minmax_codes(x: jnp.ndarray, scale: jnp.ndarray, low: jnp.ndarray,
                 bits: int) -> jnp.ndarray:
  """float32 codes of x on min/max grids (scale, low broadcast against x),
  clamped to [0, levels]: a value outside its grid takes the nearest end."""
  s = scale.astype(jnp.float32)
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  u = (x.astype(jnp.float32) - low.astype(jnp.float32)) * inv
  return jnp.clip(jnp.floor(u + 0.5), 0, (1 << bits) - 1)


def from_minmax_codes(codes: jnp.ndarray, scale: jnp.ndarray,
                      low: jnp.ndarray) -> jnp.ndarray:
  """float32 values of codes on min/max grids (broadcast against codes)."""
  return (codes.astype(jnp.float32) * scale.astype(jnp.float32)
          + low.astype(jnp.float32))


def pack(codes: jnp.ndarray, fmt: Format) -> jnp.ndarray:
  """uint codes [..., Hd] (each < 2**bits) → uint32 words [..., Hd*bits/32]."""
  head_dim = codes.shape[-1]
  codes = codes.astype(jnp.uint32)
  out, low = [], 0
  for p in fmt.planes:
    width = head_dim * p // 32
    sub = (codes >> low) & ((1 << p) - 1)
    sub = sub.reshape(*codes.shape[:-1], 32 // p, width)
    shifts = (p * jnp.arange(32 // p, dtype=jnp.uint32))[:, None]
    out.append(jnp.sum(sub << shifts, axis=-2, dtype=jnp.uint32))
    low += p
  return jnp.concatenate(out, axis=-1)


def unpack(words: jnp.ndarray, fmt: Format, head_dim: int) -> jnp.ndarray:
  """Inverse of ``pack``: uint32 words → codes [..., Hd] uint32."""
  codes, start, low = 0, 0, 0
  for p in fmt.planes:
    width = head_dim * p // 32
    w = words[..., start:start + width]
    shifts = (p * jnp.arange(32 // p, dtype=jnp.uint32))[:, None]
    sub = (w[..., None, :] >> shifts) & ((1 << p) - 1)
    codes = codes + (sub.reshape(*w.shape[:-1], head_dim) << low)
    start += width
    low += p
  return codes.astype(jnp.uint32)
