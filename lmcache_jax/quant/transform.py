"""What the cache does to head vectors before quantizing them, and undoes.

``stored(x) = ((x - shift) / scale) H``. Keys are centered on calibrated
channel means, so the per-token grid spans a key's deviation rather than the
bias every key shares; divided by per-channel scales (``kvquant``); and every
vector may be rotated by the orthonormal Hadamard matrix H. A key's few
outlier channels set its grid, so the many small channels round to almost
nothing; the rotation spreads each outlier over all channels (QuaRot,
SpinQuant) and attention does not change: q·k = (qH)·(kH) and
Σ p·v = (Σ p·vH)Hᵀ. Decode rotates the query once and the output back once;
prefill restores dequantized keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_dim(head_dim: int) -> None:
  """Sylvester's construction needs a power of two."""
  if head_dim < 1 or head_dim & (head_dim - 1):
    raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, "
                     f"got {head_dim}; set quant.rotate=False for this model")


@functools.lru_cache(maxsize=None)
def hadamard(head_dim: int) -> np.ndarray:
  """[Hd, Hd] float32 orthonormal Sylvester-Hadamard matrix (symmetric)."""
  check_dim(head_dim)
  h = np.ones((1, 1))
  while h.shape[0] < head_dim:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(head_dim)).astype(np.float32)


def rotate(x: jax.Array) -> jax.Array:
  """x [..., Hd] @ H in float32."""
  return jnp.matmul(x.astype(jnp.float32), jnp.asarray(hadamard(x.shape[-1])),
                    precision=jax.lax.Precision.HIGHEST)


def unrotate(x: jax.Array) -> jax.Array:
  """x [..., Hd] @ Hᵀ in float32 (the inverse of ``rotate``)."""
  return jnp.matmul(x.astype(jnp.float32),
                    jnp.asarray(hadamard(x.shape[-1])).T,
                    precision=jax.lax.Precision.HIGHEST)


def stored(x, scale=None, shift=None, rotated: bool = False) -> jax.Array:
  """x [..., Hd] as the cache quantizes it, float32 (None: no such step)."""
  x = jnp.asarray(x, jnp.float32)
  if shift is not None:
    x = x - shift
  if scale is not None:
    x = x / scale
  return rotate(x) if rotated else x


def restored(x, scale=None, shift=None, rotated: bool = False) -> jax.Array:
  """The inverse of ``stored``, float32."""
  x = unrotate(x) if rotated else jnp.asarray(x, jnp.float32)
  if scale is not None:
    x = x * scale
  if shift is not None:
    x = x + shift
  return x
