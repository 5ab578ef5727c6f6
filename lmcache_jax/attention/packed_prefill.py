"""A multi-token step over a packed (quantized) cache, read as decoding reads it.

Decoding writes one token per step, so its query at position p reads the
sink tokens (positions < ``sinks``) and the ``residual`` latest tokens
(positions in (p - residual, p]) as their exact copies hold them, and every
other token as its codes store it. A chunk writes all its tokens before it
attends; here each of its queries reads that same mix, so a chunked prefill
computes what a decode loop over the same tokens computes, whatever the
chunk size. Two disjoint key sets, merged exactly by log-sum-exp:

  stored  the written layer dequantized without its copies; query p sees the
          slots at positions <= p - residual that are not sink copies
  exact   the copies held before the step (those whose slot still holds
          their token) and the step's own tokens in copy form
          (``payload.as_copies``); query p sees sinks <= p and positions in
          (p - residual, p]

The equality with decoding holds when tokens enter the cache in position
order (every prefill and decode does): the copies held before a chunk then
cover the window of its first query. Keys on per-channel grids (KIVI) need
nothing more: a token read as stored lies in a key group the write sealed
from the same G tokens a decode loop seals it from, and ``dequantize``
reads the groups (``quant.payload``).

Memory: the stored set is attended in blocks of slots (``blocked``) when the
capacity allows; the exact set materializes [T, E + T] logits per head (E =
sinks + residual), so long prompts should be fed in chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmcache_jax.attention import flash
from lmcache_jax.attention.blocked import (block_size_for, blocked_attend,
                                           blocked_mass)
from lmcache_jax.attention.layer import LayerKV, matmul_precision
from lmcache_jax.cache.step import Step
from lmcache_jax.kernels.masking import MASKED, visible
from lmcache_jax.quant import payload as qpayload

# Steps with fewer queries attend to the stored set densely.
_MIN_BLOCKED_QUERIES = 16


def attend_packed_prefill(q: jax.Array, k: jax.Array, v: jax.Array,
                          before: LayerKV | None, written: LayerKV,
                          step: Step, with_mass: bool
                          ) -> tuple[jax.Array, jax.Array | None]:
  """Attention of a step's queries over a packed layer, as decoding reads it.

  Args:
    q: rotated queries [B, T, N, Hd], N = K * G grouped by kv head.
    k, v: the step's keys and values [B, T, K, Hd], as the layer was given
      them.
    before: the layer before the step wrote (None: no sequence held a token).
    written: the layer after the step wrote.
    step: this layer's step: positions [B, T] (-1 padding), slots [B, K, T],
      query weights [B, T].
    with_mass: also return the attention mass each slot received.

  Returns:
    out [B, T, N, Hd] in q's dtype (zeros for padding queries) and mass
    [B, K, S] float32 (summed over the group's heads, weighted by query;
    None without ``with_mass``).
  """
  keys, values = written.keys, written.values
  capacity = written.positions.shape[-1]
  q_pos = step.positions
  horizon = q_pos - keys.residual   # the newest position read as stored
  precision = matmul_precision(q.dtype)
  stored_pos = jnp.where(qpayload.mirrored(keys, capacity, sinks_only=True),
                         -1, written.positions)
  stored_k = qpayload.dequantize(keys, q.dtype, exact=False)
  stored_v = qpayload.dequantize(values, q.dtype, exact=False)
  block = block_size_for(capacity)
  blocked = block is not None and q.shape[1] >= _MIN_BLOCKED_QUERIES
  if blocked:
    out, lse = blocked_attend(q, stored_k, stored_v, stored_pos, horizon,
                              block=block, precision=precision)
  else:
    stored_seen = visible(stored_pos[:, :, None, :], horizon[:, None, :, None])
    out, lse, stored_logits = _masked_attend(q, stored_k, stored_v,
                                             stored_seen, precision)
  exact = None
  if keys.exact.shape[-2]:
    exact = _exact_set(k, v, before, written, step)
    ek, ev, epos, esink, _ = exact
    eseen = (visible(epos[:, :, None, :], q_pos[:, None, :, None])
             & (esink[:, :, None, :]
                | (epos[:, :, None, :] > horizon[:, None, :, None])))
    out_e, lse_e, exact_logits = _masked_attend(q, ek, ev, eseen,
                                                jax.lax.Precision.HIGHEST)
    out, lse = flash.merge(out, lse, out_e, lse_e)
  out = out.astype(q.dtype)
  if not with_mass:
    return out, None
  weights = step.query_weights
  if blocked:
    mass = blocked_mass(q, lse, stored_k, stored_pos, horizon, weights,
                        block=block, precision=precision)
  else:
    mass = _mass(stored_logits, lse, weights)
  if exact is not None:
    target = jnp.where(exact[4] >= 0, exact[4], capacity)     # [B, K, E']
    b = jnp.arange(q.shape[0])[:, None, None]
    h = jnp.arange(target.shape[1])[None, :, None]
    mass = mass.at[b, h, target].add(_mass(exact_logits, lse, weights),
                                     mode="drop")
  return out, mass


def _exact_set(k, v, before: LayerKV | None, written: LayerKV, step: Step):
  """Keys and values [B, K, E', Hd] float32 read exact, with their positions
  [B, K, E'] (-1 = none), sink flags [B, K, E'] and slots [B, K, E']: the
  copies held before the step whose slot still holds their token, then the
  step's tokens in copy form."""
  keys, values = written.keys, written.values
  capacity = written.positions.shape[-1]
  slots = step.slots
  fresh_pos = jnp.where(slots < capacity, step.positions[:, None, :], -1)
  parts = [(qpayload.as_copies(keys, jnp.swapaxes(k, 1, 2)),
            qpayload.as_copies(values, jnp.swapaxes(v, 1, 2)),
            fresh_pos, fresh_pos < keys.sinks, slots)]
  if before is not None:
    entry_slots = before.keys.exact_slots
    safe = jnp.maximum(entry_slots, 0)
    pos = jnp.take_along_axis(before.positions, safe, axis=-1)
    intact = ((entry_slots >= 0)
              & (jnp.take_along_axis(written.positions, safe, axis=-1) == pos))
    sink = jnp.arange(entry_slots.shape[-1]) < keys.sinks
    parts.insert(0, (qpayload.copies(before.keys),
                     qpayload.copies(before.values),
                     jnp.where(intact, pos, -1),
                     jnp.broadcast_to(sink, entry_slots.shape),
                     jnp.where(intact, entry_slots, -1)))
  return tuple(jnp.concatenate(leaves, axis=2) for leaves in zip(*parts))


def _masked_attend(q, keys, values, seen, precision):
  """Attention of q [B, T, N, Hd] over keys/values [B, K, S, Hd] where
  ``seen`` [B, K, T, S]: out [B, T, N, Hd] float32 (0 where nothing is
  seen), lse [B, T, N] (MASKED there) and logits [B, K, G, T, S]."""
  batch, steps, num_heads, head_dim = q.shape
  num_kv = keys.shape[1]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  seen = seen[:, :, None]
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg.astype(keys.dtype), keys,
                      precision=precision,
                      preferred_element_type=jnp.float32) * head_dim ** -0.5
  logits = jnp.where(seen, logits, MASKED)
  top = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(seen, jnp.exp(logits - top), 0.0)
  total = jnp.sum(p, axis=-1)
  some = total > 0
  lse = jnp.where(some, top[..., 0] + jnp.log(jnp.where(some, total, 1.0)),
                  MASKED)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", p.astype(values.dtype), values,
                   precision=precision, preferred_element_type=jnp.float32)
  out = out / jnp.einsum("BKGT->BTKG", jnp.where(some, total, 1.0))[..., None]
  return (out.reshape(q.shape), jnp.einsum("BKGT->BTKG", lse).reshape(
      batch, steps, num_heads), logits)


def _mass(logits, lse, weights):
  """[B, K, S] mass of logits [B, K, G, T, S] under the total lse
  [B, T, N], summed over heads and weighted by query [B, T]."""
  batch, num_kv, group, steps, _ = logits.shape
  lse = jnp.einsum("BTKG->BKGT", lse.reshape(batch, steps, num_kv, group))
  p = jnp.where(logits > MASKED / 2, jnp.exp(logits - lse[..., None]), 0.0)
  return jnp.einsum("BKGTS,BT->BKS", p, weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
