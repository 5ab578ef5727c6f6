"""A cache with the same live tokens in fewer slots.

After a prompt is prefilled into a cache of the whole prompt and compressed
to a policy's budget, most slots are holes. ``compact`` copies each row's
live slots, in slot order, to the front of a cache of ``capacity`` slots and
drops the rest, so the memory that stays allocated is what the policy keeps
plus the room it asks for. Attention masks by position, never by slot index,
so attending over the copy gives what attending over the original gives.

Per-slot state moves with its slot: dense keys and values, or the packed
codes, scales, zeros and outliers of a quantized payload (its row pools
mapped to kv heads by ``heads``), positions and the policy's scores. Exact
copies of a quantized payload are indexed by entry, not slot: they stay
where they are and ``exact_slots`` is remapped (a copy of a slot that holds
no live token becomes -1, which attention already read as invisible).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import EMPTY, KVCache
from lmcache_jax.quant import payload as qpayload


def compact(cache: KVCache, capacity: int) -> KVCache:
  """``cache`` with every row's live slots moved into ``capacity`` slots.

  Live slots keep their relative slot order and land in slots 0..n-1 of
  their row; the slots after them are empty. ``lengths`` is unchanged. The
  input is not modified (the caller drops it to free its memory); a capacity
  equal to the cache's returns the cache itself.

  Raises ValueError when ``capacity`` is not a positive whole number or is
  above the cache's, some row holds more live slots than ``capacity``, or a
  packed leaf is indexed by groups of slots rather than by slot (such a
  group cannot be split: ``compactable``).
  """
  if (isinstance(capacity, bool)
      or not isinstance(capacity, (int, np.integer)) or capacity <= 0):
    raise ValueError(f"compact: capacity must be a positive whole number of "
                     f"slots, got {capacity!r}")
  capacity = int(capacity)
  if capacity > cache.capacity:
    raise ValueError(f"compact: capacity {capacity} exceeds the cache's "
                     f"{cache.capacity} slots; compact only shrinks a cache")
  grouped = _grouped_leaf(cache)
  if grouped is not None:
    raise ValueError(f"compact: {grouped} (one per group of slots); only "
                     f"caches whose payload is indexed by single slots can be "
                     f"compacted")
  most = int(np.asarray(cache.live_slots()).max())
  if most > capacity:
    raise ValueError(f"compact: a row holds {most} live slots, more than the "
                     f"new capacity of {capacity}; evict first or keep at "
                     f"least {most} slots")
  if capacity == cache.capacity:
    return cache
  return _compact_jit(cache, capacity=capacity)


def compactable(cache: KVCache) -> bool:
  """Whether ``compact`` can move this cache's slots: every packed leaf is
  indexed by single slots (per-channel key grids over groups of slots, KIVI,
  cannot move slot by slot)."""
  return _grouped_leaf(cache) is None


def _grouped_leaf(cache: KVCache) -> str | None:
  """A description of the first packed leaf indexed by groups of slots."""
  for kv in (cache.keys, cache.values):
    if isinstance(kv, jax.Array):
      continue
    for part in kv.parts:
      for name in part.slot_leaves:
        entries = getattr(part, name).shape[qpayload.POOL_SLOT_AXIS]
        if entries != cache.capacity:
          return (f"the {part.fmt.name} payload's {name!r} holds {entries} "
                  f"entries for {cache.capacity} slots")
  return None


@functools.partial(jax.jit, static_argnames=("capacity",))
def _compact_jit(cache: KVCache, *, capacity: int) -> KVCache:
  live = cache.positions >= 0                                  # [L, B, K, S]
  # live slots first, each group in slot order; the first ``capacity`` stay
  order = jnp.argsort(~live, axis=-1, stable=True)
  kept = order[..., :capacity]                                 # [L, B, K, C]
  return cache.replace(
      keys=_take_payload(cache.keys, kept, order, live),
      values=_take_payload(cache.values, kept, order, live),
      positions=jnp.take_along_axis(cache.positions, kept, axis=-1),
      scores=jnp.take_along_axis(cache.scores, kept, axis=-1))


def _take_slots(x: jax.Array, kept: jax.Array, axis: int = 3) -> jax.Array:
  """x gathered along its slot axis ``axis`` by kept (x's shape up to that
  axis, then C)."""
  index = kept.reshape(*kept.shape, *([1] * (x.ndim - kept.ndim)))
  return jnp.take_along_axis(x, index, axis=axis)


def _take_payload(kv, kept: jax.Array, order: jax.Array, live: jax.Array):
  """A dense [L, B, K, S, Hd] array or a ``QuantizedKV`` moved to ``kept``."""
  if isinstance(kv, jax.Array):
    return _take_slots(kv, kept)
  parts = []
  for part in kv.parts:
    # each pool row takes the slots of the (layer, kv head) it holds
    layer, head = qpayload.pool_sources(part)
    row_kept = jnp.swapaxes(kept[layer, :, head], 0, 1)         # [B, P, C]
    parts.append(part.replace(**{
        name: _take_slots(getattr(part, name), row_kept,
                          qpayload.POOL_SLOT_AXIS)
        for name in part.slot_leaves}))
  exact_slots = kv.exact_slots
  if exact_slots.shape[-1]:
    # new slot of each old slot: its rank among the row's live slots, or -1
    rank = jnp.argsort(order, axis=-1).astype(jnp.int32)
    new_slot = jnp.where(live & (rank < kept.shape[-1]), rank, EMPTY)
    safe = jnp.maximum(exact_slots, 0)
    moved = jnp.take_along_axis(new_slot, safe, axis=-1)
    exact_slots = jnp.where(exact_slots >= 0, moved, EMPTY)
  return kv.replace(parts=tuple(parts), exact_slots=exact_slots)
