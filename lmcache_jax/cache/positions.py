"""Slot order helpers and StreamingLLM-style position re-assignment.

Keys are stored after RoPE. To re-assign positions after an eviction, each
kept key is rotated *forward* by the number of evicted tokens newer than it,
while queries keep their original positions. Every relative distance then
equals the distance in ranks (kept tokens in between, plus one), which is what
StreamingLLM gets by numbering the cache 0..n-1 — but here the recent window,
the bulk of the cache, never moves. A policy that re-assigns positions evicts
oldest first, so only its sink tokens (positions below ``sinks``) move.

A sink moves at every eviction, thousands of times in a long decode. Each
time it is rotated from its origin (the key before it first moved, kept in
float32 in ``SinkOrigins``) by the total shift, and rounded once to the cache
dtype: rotating the rounded key again at every eviction would compound the
rounding (in bfloat16, a 69% error after 2,048 evictions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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


@struct.dataclass
class SinkOrigins:
  """What a cache's sink keys are re-rotated from (``shift_sinks``).

    keys   [L, B, K, A, Hd]  float32: the key of position p < A as it was
                             before it first moved (post-RoPE, at p)
    shift  [L, B, K, A]      int32 positions it has moved forward since
  """
  keys: jax.Array
  shift: jax.Array


def rotate(x: jax.Array, shift: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Head vectors x [..., Hd] rotated forward by ``shift`` [...] positions.

  RoPE rotations compose additively, so this moves a key from position p to
  p + shift (the "rotate half" convention of ``arch.rope``). Angles are
  computed in float32, as ``apply_rope`` computes them; the result is
  float32. A zero shift is exactly the identity (cos 0 = 1, sin 0 = 0).
  """
  angles = shift.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def sink_slots(positions: jax.Array, sinks: int) -> jax.Array:
  """[..., sinks] int32: the slot holding position p = 0..sinks-1 in each
  row of ``positions`` [..., S], or S where no slot does."""
  match = positions[..., None, :] == jnp.arange(sinks, dtype=jnp.int32)[:, None]
  slot = jnp.argmax(match, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.any(match, axis=-1), slot, positions.shape[-1])


def unmoved_origins(keys, positions: jax.Array, sinks: int) -> SinkOrigins:
  """The origins of sinks that have not moved: their keys as they are."""
  slots = sink_slots(positions, sinks)
  return SinkOrigins(_sink_vectors(keys, slots, sinks),
                     jnp.zeros(slots.shape, jnp.int32))


def shift_sinks(keys, positions: jax.Array, origins: SinkOrigins,
                shift: jax.Array, inv_freq: np.ndarray):
  """Moves the keys of the sink positions 0..A-1 (A from ``origins``) forward
  by ``shift`` [L, B, K, S] (per slot) positions; returns (keys, origins).

  Each moving key is its origin rotated once by the total shift it has
  accumulated, then rounded once to the cache's dtype, never the previous
  rotated (rounded) key rotated again: the rounding error stays that of
  one rotation however many evictions moved it. A key that has not moved
  yet (a sink written since the last eviction included) is its own origin.
  ``keys`` is a dense [L, B, K, S, Hd] array, or a quantized payload whose
  exact copies of its sinks (entry p = position p, ``quant.payload``)
  attention reads.
  """
  sinks = origins.shift.shape[-1]
  slots = sink_slots(positions, sinks)
  present = slots < positions.shape[-1]
  current = _sink_vectors(keys, slots, sinks)
  moved = jnp.take_along_axis(shift, jnp.where(present, slots, 0), axis=-1)
  moved = jnp.where(present, moved, 0)
  start = jnp.where((origins.shift == 0)[..., None], current, origins.keys)
  total = jnp.where(present, origins.shift + moved, 0)
  moving = (moved > 0)[..., None]
  vectors = jnp.where(moving, rotate(start, total, inv_freq), current)
  return _with_sink_vectors(keys, slots, vectors), SinkOrigins(start, total)


def _sink_vectors(keys, slots: jax.Array, sinks: int) -> jax.Array:
  """[L, B, K, sinks, Hd] float32: the keys attention reads for the sinks."""
  if isinstance(keys, jax.Array):
    safe = jnp.minimum(slots, keys.shape[-2] - 1)
    return jnp.take_along_axis(keys, safe[..., None], axis=-2).astype(
        jnp.float32)
  return qpayload.copies(keys)[..., :sinks, :]


def _with_sink_vectors(keys, slots: jax.Array, vectors: jax.Array):
  """``keys`` with the sinks' vectors [L, B, K, A, Hd] written back (a slot
  of S, no sink there, is dropped)."""
  if isinstance(keys, jax.Array):
    index = jnp.broadcast_to(slots[..., None], vectors.shape)
    return jnp.put_along_axis(keys, index, vectors.astype(keys.dtype),
                              axis=-2, inplace=False, mode="drop")
  copies = qpayload.copies(keys)
  return qpayload.with_copies(
      keys, copies.at[..., :vectors.shape[-2], :].set(vectors))
