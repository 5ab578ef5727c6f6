"""Attention over cache slots in blocks of keys, with an online softmax.

Dense attention over a cache materializes float32 logits for every
(query, slot) pair: [heads, chunk, capacity] per layer, gigabytes for a 32K
prefill. Here keys are visited a block at a time, so only
[heads, chunk, block] logits exist at once, and the loop stops after the last
block holding a slot any query can see: a prefill chunk never touches the
empty slots after it, which skips the upper causal triangle of a prompt.

The per-slot attention mass that eviction scorers need takes a second pass
over the blocks (with the final normalizers), only when asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def block_size_for(capacity: int, block: int = 512) -> int | None:
  """The key block to use for ``capacity`` slots, or None to stay dense."""
  while block >= 128:
    if capacity % block == 0 and capacity >= 2 * block:
      return block
    block //= 2
  return None


def _visible(slot_pos, q_pos):
  """[B, K, 1, T, Sb] visibility of slots (positions [B, K, Sb]) to queries [B, T]."""
  slot_pos = slot_pos[:, :, None, None, :]
  q_pos = q_pos[:, None, None, :, None]
  return (slot_pos >= 0) & (slot_pos <= q_pos) & (q_pos >= 0)


def blocked_attend(q, keys, values, positions, query_positions, query_weights,
                   *, block: int, with_mass: bool, precision):
  """Causal attention of q [B, T, N, Hd] over keys/values [B, K, S, Hd].

  Same contract as the dense path: returns out [B, T, N, Hd] in q's dtype and
  mass [B, K, S] float32 (zeros when ``with_mass`` is False).
  """
  batch, steps, num_heads, head_dim = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  scale = head_dim ** -0.5
  q_max = jnp.max(query_positions)
  # Visit blocks up to the last one holding a slot some query can see.
  seen = (positions >= 0) & (positions <= q_max)
  last_slot = jnp.max(jnp.where(seen, jnp.arange(capacity), -1))
  num_blocks = (last_slot + block) // block

  def block_logits(i):
    start = i * block
    k = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2)
    pos = jax.lax.dynamic_slice_in_dim(positions, start, block, axis=2)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    visible = _visible(pos, query_positions)
    return jnp.where(visible, logits, _MASKED), visible, start

  def accumulate(i, carry):
    m, l, acc = carry
    logits, visible, start = block_logits(i)
    v = jax.lax.dynamic_slice_in_dim(values, start, block, axis=2)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "BKGTS,BKSH->BKGTH", p.astype(values.dtype), v, precision=precision,
        preferred_element_type=jnp.float32)
    return m_new, l, acc

  stats_shape = (batch, num_kv, num_heads // num_kv, steps)
  m, l, acc = jax.lax.fori_loop(
      0, num_blocks, accumulate,
      (jnp.full(stats_shape, _MASKED, jnp.float32),
       jnp.zeros(stats_shape, jnp.float32),
       jnp.zeros((*stats_shape, head_dim), jnp.float32)))
  some = l > 0
  out = acc / jnp.where(some, l, 1.0)[..., None]
  out = jnp.einsum("BKGTH->BTKGH", out).reshape(q.shape).astype(q.dtype)

  mass = jnp.zeros((batch, num_kv, capacity), jnp.float32)
  if with_mass:
    lse = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), 0.0)
    weights = query_weights.astype(jnp.float32)

    def slot_mass(i, mass):
      logits, visible, start = block_logits(i)
      p = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)
      part = jnp.einsum("BKGTS,BT->BKS", p, weights,
                        precision=jax.lax.Precision.HIGHEST)
      return jax.lax.dynamic_update_slice_in_dim(mass, part, start, axis=2)

    mass = jax.lax.fori_loop(0, num_blocks, slot_mass, mass)
  return out, mass
