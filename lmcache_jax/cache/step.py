"""Where the tokens of one forward pass go: positions, rotations and slots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmcache_jax.cache.kv_cache import KVCache, append_slots


class Step(NamedTuple):
  """What a forward pass needs besides tokens (arrays, so no recompiles).

  positions:      [B, T] original position of each token, -1 for padding.
  rope_positions: [B, T] position the token is rotated at (differs from
                  ``positions`` only when a policy re-assigns positions).
  slots:          [L, B, K, T] cache slot each token's key/value goes to;
                  the capacity (out of range) for padding.
  query_weights:  [B, T] weight of each query in the returned attention mass.
  carry_votes:    [B] bool, True where the step's votes add to those that
                  earlier steps of the same prompt cast (an observation
                  window spanning prefill chunks); None: every step's votes
                  stand alone. Only the policy reads it.
  """
  positions: jax.Array
  rope_positions: jax.Array
  slots: jax.Array
  query_weights: jax.Array
  carry_votes: jax.Array | None = None


class Span(NamedTuple):
  """The positions [start, end) of the prompt that a prefill feeds, [B] each."""
  start: jax.Array
  end: jax.Array


def prompt_span(cache: KVCache, lengths: jax.Array) -> Span:
  """The span of prompts of ``lengths`` [B] about to be fed into ``cache``
  (new arrays, so the steps that follow may donate the cache)."""
  start = jnp.array(cache.lengths, copy=True)
  return Span(start=start, end=start + jnp.asarray(lengths, jnp.int32))


def token_positions(cache: KVCache, num_new: jax.Array,
                    num_tokens: int) -> jax.Array:
  """[B, T] positions continuing each sequence; -1 where ``t >= num_new[b]``."""
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  pos = cache.lengths[:, None] + t[None, :]
  return jnp.where(t[None, :] < num_new[:, None], pos, -1)


def append_step(cache: KVCache, num_new: jax.Array, num_tokens: int) -> Step:
  """The step of a cache that never evicts: slot = position."""
  positions = token_positions(cache, num_new, num_tokens)
  return Step(positions=positions,
              rope_positions=jnp.maximum(positions, 0),
              slots=append_slots(cache, num_new, num_tokens),
              query_weights=(positions >= 0).astype(jnp.float32))
