"""Quantize and dequantize head vectors: the pure-jnp definitions.

``quantize`` / ``dequantize`` / ``fake_quant`` call the format's own hooks
(``numerics.formats``: int grids over groups of ``group_size`` channels,
fp8 with an absmax scale). These functions are the references the Pallas
kernels are tested against, and the XLA path wherever no kernel is used
(fp8, CPU).

*Outliers* (KVQuant's dense-and-sparse storage, formats with a zero code):
the ``count`` entries of largest magnitude of each vector are set to 0
before quantizing, so they do not stretch the grid (which always holds 0),
and kept beside the codes as (index, delta) pairs, delta being the exact
value minus what the codes read there (``split_outliers``,
``outlier_deltas``, ``add_outliers``).

*Per-channel groups* (KIVI's keys, ``QuantPlan.key_layout="channel"``):
``channel_quantize`` puts a group of G token vectors [..., G, Hd] on one
min/max grid per channel (``formats.minmax_grid``) and packs each token's
codes like any other; ``channel_dequantize`` reads a slot axis of such
groups back.

``kivi_fake_quant`` is the KIVI layout (keys per channel over groups of
tokens, values per token over groups of channels, recent tokens exact) for
contiguous sequences with the per-token grid arithmetic, used to measure
layouts on calibration text; the cache stores the real thing with
``key_layout="channel"`` (``quant.payload``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.numerics.formats import (Format, from_codes,
                                          from_minmax_codes, grid_codes,
                                          int_codes, int_params, minmax_codes,
                                          minmax_grid, pack, unpack,
                                          zero_value)


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
  code = grid_codes(jnp.zeros((*scale.shape, 1)), scale, zero, bits)[..., 0]
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
  return fmt.quantize(x, group_size)


def dequantize(payload: jnp.ndarray, scale: jnp.ndarray, zero, fmt: Format,
               group_size: int, head_dim: int, dtype=jnp.float32) -> jnp.ndarray:
  """Inverse of ``quantize`` up to rounding: [..., Hd] in ``dtype``."""
  return fmt.dequantize(payload, scale, zero, group_size, head_dim).astype(
      dtype)


def fake_quant(x: jnp.ndarray, fmt: Format, group_size: int,
               outliers: int = 0) -> jnp.ndarray:
  """x after a quantize/dequantize round trip, in x's dtype (packing, which
  is lossless, skipped, so any last-axis length divisible by the group
  works), keeping ``outliers`` entries per vector (formats with a zero
  code)."""
  if outliers and fmt.has_zero:
    dense, index, values = split_outliers(x, outliers)
    scale, zero = int_params(dense, fmt.bits, group_size)
    codes = int_codes(dense, scale, zero, fmt.bits, group_size)
    delta = outlier_deltas(values, index, scale, zero, fmt.bits, group_size)
    return add_outliers(from_codes(codes, scale, zero, fmt.bits, group_size),
                        index, delta).astype(x.dtype)
  return fmt.round_trip(x, group_size).astype(x.dtype)


def channel_quantize(x: jnp.ndarray, in_grid: jnp.ndarray, fmt: Format):
  """Groups of token vectors x [..., G, Hd] on one grid per channel.

  ``in_grid`` [..., G] marks the vectors whose range sets the grid (the
  others are coded on it, clamped); a group with none gets scale 0 and low
  0. Returns packed words [..., G, Hd*bits/32] uint32 and the grid's float16
  scale and low [..., Hd].
  """
  x = x.astype(jnp.float32)
  mark = in_grid[..., None]
  lo = jnp.min(jnp.where(mark, x, jnp.inf), axis=-2)
  hi = jnp.max(jnp.where(mark, x, -jnp.inf), axis=-2)
  some = jnp.any(in_grid, axis=-1)[..., None]
  scale, low = minmax_grid(jnp.where(some, lo, 0.0), jnp.where(some, hi, 0.0),
                           fmt.bits)
  return (channel_codes(x, scale[..., None, :], low[..., None, :], fmt),
          scale, low)


def channel_codes(x: jnp.ndarray, scale: jnp.ndarray, low: jnp.ndarray,
                  fmt: Format) -> jnp.ndarray:
  """Packed words [..., Hd*bits/32] of vectors x [..., Hd] on per-channel
  grids (scale, low broadcast against x), clamped to the grid."""
  codes = minmax_codes(x, scale, low, fmt.bits)
  return pack(codes.astype(jnp.uint32), fmt)


def channel_dequantize(words: jnp.ndarray, scale: jnp.ndarray,
                       low: jnp.ndarray, fmt: Format,
                       head_dim: int) -> jnp.ndarray:
  """float32 [..., S, Hd] of words [..., S, W] whose consecutive groups of
  G = S / S' slots share the grids scale, low [..., S', Hd]."""
  slots, groups = words.shape[-2], scale.shape[-2]
  codes = unpack(words, fmt, head_dim).reshape(
      *words.shape[:-2], groups, slots // groups, head_dim)
  x = from_minmax_codes(codes, scale[..., None, :], low[..., None, :])
  return x.reshape(*words.shape[:-1], head_dim)


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
