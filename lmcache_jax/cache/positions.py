"""Slot order helpers and StreamingLLM-style position re-assignment.

Keys are stored after RoPE. To re-assign positions after an eviction, each
kept key is rotated *forward* by the number of evicted tokens newer than it,
while queries keep their original positions. Every relative distance then
equals the distance in ranks (kept tokens in between, plus one), which is what
StreamingLLM gets by numbering the cache 0..n-1 — but here the recent window,
the bulk of the cache, never moves: only keys older than an eviction (the sink
tokens, heavy hitters) are rotated, so their rounding error stays confined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.models.rope import apply_rope

_LAST = np.iinfo(np.int32).max


def position_order(positions: jax.Array) -> jax.Array:
  """Slot indices [..., S] sorted by original position, empty slots last."""
  return jnp.argsort(jnp.where(positions >= 0, positions, _LAST), axis=-1,
                     stable=True)


def inverse_permutation(order: jax.Array) -> jax.Array:
  return jnp.argsort(order, axis=-1)


def rank_descending(primary: jax.Array, secondary: jax.Array) -> jax.Array:
  """Rank [..., S] of each slot in descending (primary, secondary) order; 0 = best."""
  iota = jax.lax.broadcasted_iota(jnp.int32, primary.shape, primary.ndim - 1)
  _, _, order = jax.lax.sort((-primary, -secondary, iota),
                             dimension=primary.ndim - 1, num_keys=2)
  return inverse_permutation(order)


def newer_evicted(positions: jax.Array, evicted: jax.Array) -> jax.Array:
  """[..., S] int32: per slot, how many evicted slots of its row hold a later position."""
  order = position_order(positions)
  gone = jnp.take_along_axis(evicted.astype(jnp.int32), order, axis=-1)
  after = jnp.sum(gone, axis=-1, keepdims=True) - jnp.cumsum(gone, axis=-1)
  return jnp.take_along_axis(after, inverse_permutation(order), axis=-1)


def shift_keys(keys: jax.Array, shift: jax.Array,
               inv_freq: np.ndarray) -> jax.Array:
  """Rotates post-RoPE keys [..., S, Hd] forward by ``shift`` [..., S] positions.

  RoPE rotations compose additively, so this moves a key from position p to
  p + shift. A zero shift is exactly the identity (cos 0 = 1, sin 0 = 0).
  """
  return apply_rope(keys[..., None, :], shift, inv_freq)[..., 0, :]
