"""Whether a forward pass has a slot for every token it feeds.

A token goes to the slot its policy's ``plan`` gives it; one given a slot past
the capacity is dropped by the scatter while its sequence's length still
advances, so attention silently misses it. ``prefill`` and ``decode`` check
here before a pass runs, and raise instead:

* ``KeepAll`` appends: the new tokens of sequence ``b`` go to slots
  ``lengths[b]``, ``lengths[b] + 1``, ..., so a sequence holds at most
  ``capacity`` tokens in all.
* An evicting policy puts a pass's tokens into each (layer, head) row's free
  slots and evicts only after the pass: a pass of ``n`` tokens needs ``n``
  free slots in every row of its sequence. While decoding, a full row always
  evicts, down to at most the policy's ``max_row_slots``; so one token per
  step always finds a slot, unless the cache is no larger than that.
"""

from __future__ import annotations

import numpy as np

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.policy import CachePolicy, KeepAll


def appends(policy: CachePolicy) -> bool:
  """Whether ``policy`` places tokens at slot = position (evicts nothing)."""
  return isinstance(policy, KeepAll)


def fullest_rows(cache: KVCache) -> np.ndarray:
  """[B] live slots in each sequence's fullest (layer, head) row."""
  return np.asarray(cache.live_slots()).max(axis=(0, 2))


def check_prompts(cache: KVCache, policy: CachePolicy,
                  prompt_lengths: np.ndarray) -> None:
  """Before a prefill under an appending policy: every prompt fits after the
  tokens its sequence holds (an evicting policy is checked per pass)."""
  if not appends(policy):
    return
  held = np.asarray(cache.lengths)
  _refuse_appending(held, prompt_lengths, cache.capacity, policy,
                    "prefill", "its prompt adds")


def check_pass(cache: KVCache, policy: CachePolicy,
               num_new: np.ndarray) -> None:
  """Before one pass of an evicting policy feeding ``num_new[b]`` tokens to
  sequence ``b``: every row of the sequence has that many free slots."""
  if appends(policy):
    return
  live = fullest_rows(cache)
  over = np.flatnonzero(live + num_new > cache.capacity)
  if over.size:
    b = over[0]
    raise ValueError(
        f"prefill: a pass feeds {num_new[b]} tokens to sequence {b} (length "
        f"{int(cache.lengths[b])}), whose fullest (layer, head) row holds "
        f"{live[b]} of the cache's {cache.capacity} slots, and policy "
        f"{policy.name!r} evicts only after a pass; use a cache of at least "
        f"{live[b] + num_new[b]} slots or a smaller prefill chunk")


def check_decode(cache: KVCache, policy: CachePolicy, active: np.ndarray,
                 num_tokens: int) -> None:
  """Before decoding: feeding up to ``num_tokens`` tokens, one per step, to
  each ``active`` [B] sequence of ``cache`` drops none."""
  if num_tokens <= 0 or not active.any():
    return
  if appends(policy):
    held = np.where(active, np.asarray(cache.lengths), 0)
    _refuse_appending(held, np.where(active, num_tokens, 0), cache.capacity,
                      policy, "decode", "decoding adds up to")
    return
  live = np.where(active, fullest_rows(cache), 0)
  row_keeps = getattr(policy, "max_row_slots", cache.capacity)
  if row_keeps < cache.capacity:   # a full row frees slots after each step
    full = np.flatnonzero(live >= cache.capacity)
    if full.size:
      raise ValueError(
          f"decode: a row of sequence {full[0]} (length "
          f"{int(cache.lengths[full[0]])}) holds all {cache.capacity} slots of "
          f"the cache, and policy {policy.name!r} evicts only after a step; "
          f"compress the prompt first (policy.after_prefill) or use a larger "
          f"cache")
    return
  over = np.flatnonzero(live + num_tokens > cache.capacity)
  if over.size:
    b = over[0]
    raise ValueError(
        f"decode: sequence {b} (length {int(cache.lengths[b])}) has a row "
        f"holding {live[b]} of the cache's {cache.capacity} slots and "
        f"decoding feeds up to {num_tokens} more tokens, but policy "
        f"{policy.name!r} keeps up to {row_keeps} per row, so evicting frees "
        f"none; use a cache of more than {row_keeps} slots")


def _refuse_appending(held: np.ndarray, new: np.ndarray, capacity: int,
                      policy: CachePolicy, where: str, adds: str) -> None:
  over = np.flatnonzero(held + new > capacity)
  if over.size:
    b = over[0]
    raise ValueError(
        f"{where}: sequence {b} holds {held[b]} tokens and {adds} {new[b]}, "
        f"{held[b] + new[b]} in all, past the cache's capacity of {capacity} "
        f"slots (policy {policy.name!r} evicts nothing); use a cache of at "
        f"least {held[b] + new[b]} slots")
