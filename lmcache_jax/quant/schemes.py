"""Quantize and dequantize head vectors: the pure-jnp definitions.

Every format quantizes each head vector [..., Hd] over groups of
``group_size`` contiguous channels. Int formats are asymmetric (min/max):
``x ≈ code * scale + zero`` with a float16 scale and zero per group; codes
are rounded half up, ``floor(u + 0.5)``, which every backend computes alike.
fp8 stores ``x / scale`` in float8 e4m3 with ``scale = absmax / 448``.

These functions are the references the Pallas kernels are tested against,
and the XLA path wherever no kernel is used (fp8, CPU).

``kivi_fake_quant`` is the KIVI layout (keys per channel over groups of
tokens, values per token over groups of channels, recent tokens exact) for
contiguous sequences, used to measure layouts on calibration text; the cache
itself stores per-token groups for both (see docs/architecture.md).
"""

from __future__ import annotations

import jax.numpy as jnp

from lmcache_jax.quant.formats import FP8_MAX, Format, pack, unpack


def _groups(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def int_params(x: jnp.ndarray, bits: int, group_size: int):
  """float16 (scale, zero) [..., Hd/g] of the asymmetric grid of each group."""
  g = _groups(x.astype(jnp.float32), group_size)
  lo = jnp.min(g, axis=-1)
  hi = jnp.max(g, axis=-1)
  zero = lo.astype(jnp.float16)
  scale = ((hi - zero.astype(jnp.float32)) / ((1 << bits) - 1)).astype(
      jnp.float16)
  return scale, zero


def int_codes(x: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray,
              bits: int, group_size: int) -> jnp.ndarray:
  """uint32 codes [..., Hd] of x on the grid (scale, zero) [..., Hd/g]."""
  g = _groups(x.astype(jnp.float32), group_size)
  s = scale.astype(jnp.float32)[..., None]
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  u = (g - zero.astype(jnp.float32)[..., None]) * inv
  codes = jnp.clip(jnp.floor(u + 0.5), 0, (1 << bits) - 1)
  return codes.reshape(x.shape).astype(jnp.uint32)


def quantize(x: jnp.ndarray, fmt: Format, group_size: int):
  """x [..., Hd] → (payload, scale [..., Hd/g] f16, zero or None).

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
    codes = _groups(unpack(payload, fmt, head_dim).astype(jnp.float32),
                    group_size)
    x = (codes * scale.astype(jnp.float32)[..., None]
         + zero.astype(jnp.float32)[..., None])
  return x.reshape(*payload.shape[:-1], head_dim).astype(dtype)


def fake_quant(x: jnp.ndarray, fmt: Format, group_size: int) -> jnp.ndarray:
  """x after a quantize/dequantize round trip, in x's dtype (packing, which
  is lossless, skipped, so any last-axis length divisible by the group works)."""
  if fmt.kind == "fp8":
    payload, scale, _ = quantize(x, fmt, group_size)
    return dequantize(payload, scale, None, fmt, group_size, x.shape[-1],
                      x.dtype)
  scale, zero = int_params(x, fmt.bits, group_size)
  codes = _groups(int_codes(x, scale, zero, fmt.bits, group_size)
                  .astype(jnp.float32), group_size)
  y = (codes * scale.astype(jnp.float32)[..., None]
       + zero.astype(jnp.float32)[..., None])
  return y.reshape(x.shape).astype(x.dtype)


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
