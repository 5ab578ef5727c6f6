"""Grouped-query attention over the slots of a KV cache, one layer.

New keys and values are first written into their slots, then every query
attends to all occupied slots whose original position is not after its own.
Attention also reports the mass each slot received (summed over the group's
query heads and the weighted queries), which eviction scorers consume.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_MASKED = -1e30


class LayerKV(NamedTuple):
  """One layer's slice of the cache: keys/values [B, K, S, Hd], positions [B, K, S]."""
  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  scores: jax.Array


def matmul_precision(dtype) -> jax.lax.Precision:
  """Full float32 products when computing in float32 (no TF32 on GPUs)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def write_slots(layer: LayerKV, k: jax.Array, v: jax.Array,
                token_positions: jax.Array, slots: jax.Array) -> LayerKV:
  """Stores k, v [B, T, K, Hd] of tokens at ``token_positions`` [B, T] in ``slots`` [B, K, T].

  Out-of-range slots (padding) are dropped. A written slot's score restarts at 0.
  """
  batch, _, num_kv, _ = k.shape
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_kv)[None, :, None]
  pos = jnp.broadcast_to(token_positions[:, None, :], slots.shape)
  return LayerKV(
      keys=layer.keys.at[b, h, slots].set(
          jnp.swapaxes(k, 1, 2).astype(layer.keys.dtype), mode="drop"),
      values=layer.values.at[b, h, slots].set(
          jnp.swapaxes(v, 1, 2).astype(layer.values.dtype), mode="drop"),
      positions=layer.positions.at[b, h, slots].set(pos, mode="drop"),
      scores=layer.scores.at[b, h, slots].set(0.0, mode="drop"),
  )


def attend(q: jax.Array, layer: LayerKV, query_positions: jax.Array,
           query_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal attention of q [B, T, N, Hd] over the cache's slots.

  Args:
    q: rotated queries, N = K * G query heads grouped by kv head.
    layer: the cache after this step's keys were written.
    query_positions: [B, T] original positions; -1 marks padding.
    query_weights: [B, T] weight of each query in the returned slot mass.

  Returns:
    out [B, T, N, Hd] in q's dtype (zeros for padding queries), and
    mass [B, K, S] float32: attention each slot received, summed over the
    group's heads and weighted queries.
  """
  batch, steps, num_heads, head_dim = q.shape
  num_kv = layer.keys.shape[1]
  qg = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
  precision = matmul_precision(q.dtype)
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, layer.keys,
                      precision=precision,
                      preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  slot_pos = layer.positions[:, :, None, None, :]          # [B, K, 1, 1, S]
  q_pos = query_positions[:, None, None, :, None]          # [B, 1, 1, T, 1]
  visible = (slot_pos >= 0) & (slot_pos <= q_pos) & (q_pos >= 0)
  logits = jnp.where(visible, logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(visible, probs, 0.0)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", probs.astype(layer.values.dtype),
                   layer.values, precision=precision,
                   preferred_element_type=jnp.float32)
  mass = jnp.einsum("BKGTS,BT->BKS", probs, query_weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  return out.reshape(q.shape).astype(q.dtype), mass
