"""Quantize and dequantize head vectors: the pure-jnp definitions.

Every format quantizes each head vector [..., Hd] over groups of
``group_size`` contiguous channels. Int formats are asymmetric (min/max):
``x ≈ code * scale + zero`` with a float16 scale and a uint8 *zero code* per
group: ``zero = -scale * levels * zc / 255`` (``levels = 2**bits - 1``), the
share of the grid below 0 in 255ths, so a group costs 3 bytes, not 4. The
grid always holds 0; rounding the zero moves it by at most
``scale * levels / 510`` (1/34 of a step at 4 bits). Codes are rounded half
up, ``floor(u + 0.5)``, which every backend computes alike.
fp8 stores ``x / scale`` in float8 e4m3 with ``scale = absmax / 448``.

These functions are the references the Pallas kernels are tested against,
and the XLA path wherever no kernel is used (fp8, CPU).

*Outliers* (KVQuant's dense-and-sparse storage): the ``count`` entries of
largest magnitude of each vector are set to 0 before quantizing, so they do
not stretch the grid (which always holds 0), and kept beside the codes as
(index, delta) pairs, delta being the exact value minus what the codes read
there (``split_outliers``, ``outlier_deltas``, ``add_outliers``).

``kivi_fake_quant`` is the KIVI layout (keys per channel over groups of
tokens, values per token over groups of channels, recent tokens exact) for
contiguous sequences, used to measure layouts on calibration text; the cache
itself stores per-token groups for both (see docs/architecture.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.numerics.formats import FP8_MAX, Format, pack, unpack


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


def _grid_codes(g: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
                bits: int) -> jnp.ndarray:
  """float32 codes of values g [..., Hd/g, n] on each group's grid."""
  s = scale.astype(jnp.float32)[..., None]
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  u = (g - zero_value(scale, zero, bits)[..., None]) * inv
  return jnp.clip(jnp.floor(u + 0.5), 0, (1 << bits) - 1)


def int_codes(x: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
              bits: int, group_size: int) -> jnp.ndarray:
  """uint32 codes [..., Hd] of x on the grid (scale, zero code) [..., Hd/g]."""
  codes = _grid_codes(_groups(x.astype(jnp.float32), group_size), scale, zero,
                      bits)
  return codes.reshape(x.shape).astype(jnp.uint32)


def from_codes(codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
               bits: int, group_size: int) -> jnp.ndarray:
  """float32 values [..., Hd] of unpacked codes on their grids [..., Hd/g]."""
  g = _groups(codes.astype(jnp.float32), group_size)
  x = (g * scale.astype(jnp.float32)[..., None]
       + zero_value(scale, zero, bits)[..., None])
  return x.reshape(codes.shape)


def split_outliers(x: jnp.ndarray, count: int):
  """(x with its ``count`` largest-magnitude entries per vector set to 0,
  their channels [..., count] uint8, their float32 values [..., count])."""
  x = x.astype(jnp.float32)
  _, index = jax.lax.top_k(jnp.abs(x), count)
  values = jnp.take_along_axis(x, index, axis=-1)
  picked = jnp.any(jnp.arange(x.shape[-1]) == index[..., None], axis=-2)
  return jnp.where(picked, 0.0, x), index.astype(jnp.uint8), values


def outlier_deltas(values, index, scale, zero, bits: int, group_size: int):
  """float16 exact minus stored value at each outlier (the codes there hold
  0 rounded onto the group's grid)."""
  code = _grid_codes(jnp.zeros((*scale.shape, 1)), scale, zero, bits)[..., 0]
  stored_zero = (code * scale.astype(jnp.float32)
                 + zero_value(scale, zero, bits))
  group = index.astype(jnp.int32) // group_size
  return (values - jnp.take_along_axis(stored_zero, group, axis=-1)
          ).astype(jnp.float16)


def add_outliers(x: jnp.ndarray, index, delta) -> jnp.ndarray:
  """x [..., Hd] (float32) with ``delta`` added at the outlier channels."""
  onehot = jnp.arange(x.shape[-1]) == index.astype(jnp.int32)[..., None]
  return x + jnp.sum(jnp.where(onehot, delta.astype(jnp.float32)[..., None],
                               0.0), axis=-2)


def quantize(x: jnp.ndarray, fmt: Format, group_size: int):
  """x [..., Hd] → (payload, scale [..., Hd/g] f16, zero code u8 or None).

  payload is packed uint32 words [..., Hd*bits/32] (int) or float8 [..., Hd].
  """
  if fmt.kind == "fp8":
    g = _groups(x.astype(jnp.float32), group_size)
    scale = (jnp.max(jnp.abs(g), axis=-1) / FP8_MAX).astype(jnp.float16)
    s = scale.astype(jnp.float32)[..., None]
    y = jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)
    return y.reshape(x.shape).astype(jnp.float8_e4m3fn), scale, None
  scale, zero = int_params(x, fmt.bits, group_size)
  codes = int_codes(x, scale, zero, fmt.bits, group_size)
  return pack(codes, fmt), scale, zero


def dequantize(payload: jnp.ndarray, scale: jnp.ndarray, zero, fmt: Format,
               group_size: int, head_dim: int, dtype=jnp.float32) -> jnp.ndarray:
  """Inverse of ``quantize`` up to rounding: [..., Hd] in ``dtype``."""
  if fmt.kind == "fp8":
    y = _groups(payload.astype(jnp.float32), group_size)
    x = y * scale.astype(jnp.float32)[..., None]
  else:
    x = from_codes(unpack(payload, fmt, head_dim), scale, zero, fmt.bits,
                   group_size)
  return x.reshape(*payload.shape[:-1], head_dim).astype(dtype)


def fake_quant(x: jnp.ndarray, fmt: Format, group_size: int,
               outliers: int = 0) -> jnp.ndarray:
  """x after a quantize/dequantize round trip, in x's dtype (packing, which
  is lossless, skipped, so any last-axis length divisible by the group
  works), keeping ``outliers`` entries per vector (int formats)."""
  if outliers and fmt.kind == "int":
    dense, index, values = split_outliers(x, outliers)
    scale, zero = int_params(dense, fmt.bits, group_size)
    codes = int_codes(dense, scale, zero, fmt.bits, group_size)
    delta = outlier_deltas(values, index, scale, zero, fmt.bits, group_size)
    return add_outliers(from_codes(codes, scale, zero, fmt.bits, group_size),
                        index, delta).astype(x.dtype)
  if fmt.kind == "fp8":
    payload, scale, _ = quantize(x, fmt, group_size)
    return dequantize(payload, scale, None, fmt, group_size, x.shape[-1],
                      x.dtype)
  scale, zero = int_params(x, fmt.bits, group_size)
  codes = int_codes(x, scale, zero, fmt.bits, group_size)
  return from_codes(codes, scale, zero, fmt.bits, group_size).astype(x.dtype)


def kivi_fake_quant(keys: jnp.ndarray, values: jnp.ndarray, fmt: Format,
                    group_size: int, residual: int):
  """KIVI round trip of contiguous keys/values [..., T, Hd].

  Keys: per channel over groups of ``group_size`` tokens; values: per token
  over groups of ``group_size`` channels; the last ``residual`` tokens and
  the trailing partial token group stay exact (KIVI's streaming rule).
  """
  steps = keys.shape[-2]
  full = max(0, (steps - residual) // group_size * group_size)
  k_t = jnp.swapaxes(keys[..., :full, :], -1, -2)        # [..., Hd, full]
  k_q = jnp.swapaxes(fake_quant(k_t, fmt, group_size), -1, -2)
  v_q = fake_quant(values[..., :full, :], fmt, group_size)
  return (jnp.concatenate([k_q, keys[..., full:, :]], axis=-2),
          jnp.concatenate([v_q, values[..., full:, :]], axis=-2))
