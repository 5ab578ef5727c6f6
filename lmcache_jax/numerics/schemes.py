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

``kivi_fake_quant`` is the KIVI layout (keys per channel over groups of
tokens, values per token over groups of channels, recent tokens exact) for
contiguous sequences, used to measure layouts on calibration text; the cache
itself stores per-token groups for both (see docs/architecture.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.numerics.formats import (Format, from_codes, grid_codes,
                                          int_codes, int_params, zero_value)


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
