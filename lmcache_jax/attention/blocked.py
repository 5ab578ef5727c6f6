"""Attention over cache slots in blocks of keys, with an online softmax (XLA).

Dense attention over a cache materializes float32 logits for every
(query, slot) pair: [heads, chunk, capacity] per layer, gigabytes for a 32K
prefill. Here keys are visited a block at a time, so only
[heads, chunk, block] logits exist at once, and the loop stops after the last
block holding a slot any query can see: a prefill chunk never touches the
empty slots after it.

``blocked_mass`` is a separate pass that needs the queries' log-sum-exp: the
attention each slot receives, for the queries a policy asks about.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.kernels.masking import MASKED, visible


def block_size_for(capacity: int, block: int = 512) -> int | None:
  """The key block to use for ``capacity`` slots (the last block may be
  partial), or None to stay dense (caches of fewer than 256 slots)."""
  while block >= 128:
    if capacity >= 2 * block:
      return block
    block //= 2
  return None


def _padded(x, block: int, fill=0):
  """x [B, K, S, ...] with the slot axis padded to a multiple of ``block``."""
  pad = -x.shape[2] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[2] = (0, pad)
  return jnp.pad(x, widths, constant_values=fill)


def _blocks(q, keys, positions, query_positions, block, precision):
  """(number of blocks to visit, block → (logits, visible, start)) over
  ``keys`` and ``positions`` padded to whole blocks."""
  batch, steps, num_heads, head_dim = q.shape
  keys, positions = _padded(keys, block), _padded(positions, block, -1)
  num_kv, capacity = keys.shape[1], keys.shape[2]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  q_max = jnp.max(query_positions)
  seen = (positions >= 0) & (positions <= q_max)
  last_slot = jnp.max(jnp.where(seen, jnp.arange(capacity), -1))
  num_blocks = (last_slot + block) // block

  def block_logits(i):
    start = i * block
    k = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2)
    pos = jax.lax.dynamic_slice_in_dim(positions, start, block, axis=2)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, precision=precision,
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    seen = visible(pos[:, :, None, None, :],
                   query_positions[:, None, None, :, None])
    return jnp.where(seen, logits, MASKED), seen, start

  return num_blocks, block_logits


def blocked_attend(q, keys, values, positions, query_positions, *, block: int,
                   precision):
  """Causal attention of q [B, T, N, Hd] over keys/values [B, K, S, Hd].

  Returns out [B, T, N, Hd] in q's dtype (zeros where nothing is visible)
  and lse [B, T, N] float32 (MASKED where nothing is visible).
  """
  batch, steps, num_heads, head_dim = q.shape
  num_kv = keys.shape[1]
  num_blocks, block_logits = _blocks(q, keys, positions, query_positions,
                                     block, precision)
  padded_values = _padded(values, block)

  def accumulate(i, carry):
    m, l, acc = carry
    logits, seen, start = block_logits(i)
    v = jax.lax.dynamic_slice_in_dim(padded_values, start, block, axis=2)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    p = jnp.where(seen, jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "BKGTS,BKSH->BKGTH", p.astype(values.dtype), v, precision=precision,
        preferred_element_type=jnp.float32)
    return m_new, l, acc

  stats_shape = (batch, num_kv, num_heads // num_kv, steps)
  m, l, acc = jax.lax.fori_loop(
      0, num_blocks, accumulate,
      (jnp.full(stats_shape, MASKED, jnp.float32),
       jnp.zeros(stats_shape, jnp.float32),
       jnp.zeros((*stats_shape, head_dim), jnp.float32)))
  some = l > 0
  out = acc / jnp.where(some, l, 1.0)[..., None]
  lse = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), MASKED)
  out = jnp.einsum("BKGTH->BTKGH", out).reshape(q.shape).astype(q.dtype)
  return out, jnp.einsum("BKGT->BTKG", lse).reshape(batch, steps, num_heads)


def blocked_mass(q, lse, keys, positions, query_positions, query_weights, *,
                 block: int, precision):
  """Attention mass [B, K, S] float32 each slot receives from the queries
  q [B, T, N, Hd] (log-sum-exp ``lse`` [B, T, N]), summed over the group's
  heads and weighted by ``query_weights`` [B, T]."""
  batch, steps, num_heads, _ = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  num_blocks, block_logits = _blocks(q, keys, positions, query_positions,
                                     block, precision)
  lse = jnp.einsum("BTKG->BKGT", lse.reshape(batch, steps, num_kv, -1))
  weights = query_weights.astype(jnp.float32)

  def slot_mass(i, mass):
    logits, seen, start = block_logits(i)
    p = jnp.where(seen, jnp.exp(logits - lse[..., None]), 0.0)
    part = jnp.einsum("BKGTS,BT->BKS", p, weights,
                      precision=jax.lax.Precision.HIGHEST)
    return jax.lax.dynamic_update_slice_in_dim(mass, part, start, axis=2)

  padded = capacity + -capacity % block
  mass = jax.lax.fori_loop(0, num_blocks, slot_mass,
                           jnp.zeros((batch, num_kv, padded), jnp.float32))
  return mass[:, :, :capacity]
