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

from lmcache_jax.quant import payload as qpayload


_LAST = np.iinfo(np.int32).max


def position_order(positions: jax.Array) -> jax.Array:
  """Slot indices [..., S] sorted by original position, empty slots last."""
  return jnp.argsort(jnp.where(positions >= 0, positions, _LAST), axis=-1,
                     stable=True)


def inverse_permutation(order: jax.Array) -> jax.Array:
  """Where each slot went in ``order`` (a scatter: far cheaper than a sort)."""
  iota = jax.lax.broadcasted_iota(order.dtype, order.shape, order.ndim - 1)
  return jnp.put_along_axis(jnp.zeros_like(order), order, iota, axis=-1,
                            inplace=False)


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


def shift_keys(keys: jax.Array, shift: jax.Array, inv_freq: np.ndarray,
               max_shift: int | None = None) -> jax.Array:
  """Rotates post-RoPE keys [..., N, Hd] forward by ``shift`` [..., N] positions.

  RoPE rotations compose additively, so this moves a key from position p to
  p + shift (the "rotate half" convention of ``models.rope``). Shifts lie in
  [0, max_shift] (default N: a row cannot lose more than its slots), so the
  cosines and sines come from a small table instead of one evaluation per key
  element. A zero shift is exactly the identity (cos 0 = 1, sin 0 = 0).
  """
  max_shift = keys.shape[-2] if max_shift is None else max_shift
  table = (jnp.arange(max_shift + 1, dtype=jnp.float32)[:, None]
           * jnp.asarray(inv_freq))
  cos = jnp.cos(table)[shift]
  sin = jnp.sin(table)[shift]
  x1, x2 = jnp.split(keys.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(keys.dtype)


def shift_few_keys(keys: jax.Array, shift: jax.Array, inv_freq: np.ndarray,
                   count: int) -> jax.Array:
  """``shift_keys`` for rows in which at most ``count`` slots move (shift > 0),
  e.g. the sink tokens of a StreamingLLM cache: only those slots are read,
  rotated and written back, not the whole cache. Exact under that bound."""
  count = min(count, shift.shape[-1])
  _, moving = jax.lax.top_k(shift, count)
  rotated = shift_keys(jnp.take_along_axis(keys, moving[..., None], axis=-2),
                       jnp.take_along_axis(shift, moving, axis=-1), inv_freq,
                       max_shift=shift.shape[-1])
  return jnp.put_along_axis(keys, jnp.broadcast_to(moving[..., None],
                                                   rotated.shape),
                            rotated, axis=-2, inplace=False)


def shift_exact_copies(keys, shift: jax.Array, inv_freq: np.ndarray):
  """A quantized payload whose exact copies are rotated by the shift
  of the slot each mirrors (``quant.payload``: sinks and recent tokens)."""
  mirrored = keys.exact_slots >= 0
  entry_shift = jnp.take_along_axis(shift, jnp.maximum(keys.exact_slots, 0),
                                    axis=-1)
  entry_shift = jnp.where(mirrored, entry_shift, 0)
  return qpayload.with_copies(keys, shift_keys(
      qpayload.copies(keys), entry_shift, inv_freq, max_shift=shift.shape[-1]))
