"""Number formats of the quantized cache and their dense bit packing.

A format says how one head's vector of ``head_dim`` channels is stored:

* ``int2``/``int3``/``int4``/``int8``: asymmetric uniform codes over groups
  of ``group_size`` channels (a float16 scale and a uint8 zero code per
  group, ``numerics.schemes``), packed densely into uint32 words: exactly
  ``head_dim * bits / 32`` words.
* ``fp8``: float8 e4m3 values with a float16 scale per group (symmetric).

Packing is *planar*: a b-bit code is split into planes of 8, 4, 2 or 1 bits
(3 = 2 + 1). A plane of p bits holds ``W = head_dim * p / 32`` words; channel
``d`` sits in word ``d % W`` at bit ``p * (d // W)``. Unpacking a word block
with one shift yields ``W`` *contiguous* channels, so kernels never interleave
lanes, and a kernel reading a chunk of channels needs only whole-word loads.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_PLANES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


@dataclasses.dataclass(frozen=True)
class Format:
  """One storage format; frozen and hashable (a static argument under jit)."""
  name: str
  bits: int
  kind: str  # "int" or "fp8"

  @property
  def planes(self) -> tuple[int, ...]:
    return _PLANES[self.bits] if self.kind == "int" else ()

  def words(self, head_dim: int) -> int:
    """uint32 words per head vector (int formats)."""
    return head_dim * self.bits // 32

  def chunk(self, head_dim: int) -> int:
    """Channels one shift of a word block yields: the narrowest plane's W."""
    return head_dim * min(self.planes) // 32

  def check(self, head_dim: int, group_size: int) -> None:
    """Raises a clear error when the shapes cannot hold this format."""
    if head_dim % group_size:
      raise ValueError(f"group_size={group_size} must divide head_dim="
                       f"{head_dim}; valid: "
                       f"{[g for g in range(1, head_dim + 1) if head_dim % g == 0]}")
    if self.kind != "int":
      return
    if head_dim % 32:
      raise ValueError(f"{self.name} packing needs head_dim to be a multiple "
                       f"of 32, got {head_dim}")
    widest = head_dim * max(self.planes) // 32
    if group_size % widest:
      raise ValueError(
          f"{self.name} with head_dim={head_dim} packs {widest} channels per "
          f"word block, so group_size must be a multiple of {widest}; got "
          f"{group_size}")


FORMATS = {f.name: f for f in (Format("int2", 2, "int"), Format("int3", 3, "int"),
                               Format("int4", 4, "int"), Format("int8", 8, "int"),
                               Format("fp8", 8, "fp8"))}
FP8_MAX = 448.0  # largest finite float8 e4m3fn


def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ValueError(f"unsupported KV format {name!r}; valid: "
                     f"{', '.join(FORMATS)}")
  return FORMATS[name]


def format_for_bits(bits) -> Format:
  """``int{bits}`` for bits in 2, 3, 4, 8."""
  if bits not in (2, 3, 4, 8):
    raise ValueError(f"unsupported bit width {bits!r}; valid: 2, 3, 4, 8 "
                     f"(or 16 for an unquantized cache)")
  return FORMATS[f"int{bits}"]


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
