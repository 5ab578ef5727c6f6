"""What every attention implementation agrees on: which slots a query sees,
and the logit given to one it does not."""

from __future__ import annotations

import jax

# The logit of a masked slot: exp(MASKED - m) is 0 for any real max m, and
# MASKED - MASKED = 0 keeps an all-masked row finite (its sum stays 0).
MASKED = -1e30


def visible(slot_pos: jax.Array, q_pos: jax.Array) -> jax.Array:
  """A slot is visible to a query when it holds a token (position >= 0) that
  is not after the query's position, and the query is real (position >= 0).

  Both arguments broadcast against each other: the caller places their axes.
  """
  return (slot_pos >= 0) & (slot_pos <= q_pos) & (q_pos >= 0)
