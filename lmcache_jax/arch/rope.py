"""Rotary position embeddings in the "rotate half" convention."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lmcache_jax.arch.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair rotation frequencies [head_dim // 2], with the checkpoint's scaling.

  Llama-3.1 scaling leaves high frequencies alone, divides low ones by
  ``factor`` and blends in between; linear scaling divides all of them.
  """
  half = cfg.head_dim // 2
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half)
  inv_freq = inv_freq / cfg.rope_linear_factor
  if cfg.rope_scaling is not None:
    factor, low_ff, high_ff, original_max = cfg.rope_scaling
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max / low_ff
    high_wavelen = original_max / high_ff
    smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor,
                        np.where(wavelen < high_wavelen, inv_freq, blended))
  return inv_freq.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray,
               inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates ``x`` [..., T, heads, head_dim] by ``positions`` [..., T].

  Angles are computed in float32 whatever the dtype of ``x``, so positions in
  the tens of thousands keep their precision.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos = jnp.cos(angles)[..., None, :]  # [..., T, 1, half]
  sin = jnp.sin(angles)[..., None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
