"""One layer of the cache as attention sees it, and how new tokens enter it.

``LayerKV`` holds either one layer (keys/values [B, K, S, Hd], positions and
scores [B, K, S]) or every layer stacked on a leading axis [L, ...]: the
model's scan carries the stacked cache, and ``write_stacked`` writes a
layer's new tokens into it in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmcache_jax.quant import payload as qpayload


class LayerKV(NamedTuple):
  """One layer's slice of the cache: keys/values [B, K, S, Hd] (or quantized
  payloads), positions [B, K, S]."""
  keys: jax.Array | qpayload.QuantizedKV
  values: jax.Array | qpayload.QuantizedKV
  positions: jax.Array
  scores: jax.Array


def matmul_precision(dtype) -> jax.lax.Precision:
  """Full float32 products when computing in float32 (no TF32 on GPUs)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def is_quantized(layer: LayerKV) -> bool:
  return isinstance(layer.keys, qpayload.QuantizedKV)


def write_slots(layer: LayerKV, k: jax.Array, v: jax.Array,
                token_positions: jax.Array, slots: jax.Array) -> LayerKV:
  """Stores k, v [B, T, K, Hd] of tokens at ``token_positions`` [B, T] in ``slots`` [B, K, T].

  Out-of-range slots (padding) are dropped. A written slot's score restarts at 0.
  """
  batch, _, num_kv, _ = k.shape
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_kv)[None, :, None]
  pos = jnp.broadcast_to(token_positions[:, None, :], slots.shape)
  if is_quantized(layer):
    keys = qpayload.write(layer.keys, jnp.swapaxes(k, 1, 2), token_positions,
                          slots)
    values = qpayload.write(layer.values, jnp.swapaxes(v, 1, 2),
                            token_positions, slots)
  else:
    keys = layer.keys.at[b, h, slots].set(
        jnp.swapaxes(k, 1, 2).astype(layer.keys.dtype), mode="drop")
    values = layer.values.at[b, h, slots].set(
        jnp.swapaxes(v, 1, 2).astype(layer.values.dtype), mode="drop")
  return LayerKV(
      keys=keys,
      values=values,
      positions=layer.positions.at[b, h, slots].set(pos, mode="drop"),
      scores=layer.scores.at[b, h, slots].set(0.0, mode="drop"),
  )



def layer_of(stacked: LayerKV, layer: jax.Array) -> LayerKV:
  """Layer ``layer`` (a traced index) of a stacked cache."""
  def take(kv):
    if kv is None:
      return None
    if isinstance(kv, qpayload.QuantizedKV):
      return qpayload.layer_view(kv, layer)
    return jax.lax.dynamic_index_in_dim(kv, layer, keepdims=False)
  return LayerKV(*map(take, stacked))


def write_stacked(stacked: LayerKV, layer: jax.Array, k: jax.Array,
                  v: jax.Array, token_positions: jax.Array,
                  slots: jax.Array) -> LayerKV:
  """``write_slots`` into layer ``layer`` of a stacked cache.

  Scattered straight into the stacked arrays (in place under a donated or
  carried buffer: no copy of the layer). Packed payloads scatter their
  per-token codes the same way; their small leaves (exact copies, slot map)
  and per-channel key parts go through a copy of the layer
  (``quant.payload.write``).
  """
  batch, _, num_kv, _ = k.shape
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_kv)[None, :, None]
  pos = jnp.broadcast_to(token_positions[:, None, :], slots.shape)
  put = lambda a, x: a.at[layer, b, h, slots].set(  # noqa: E731
      x.astype(a.dtype), mode="drop")
  if is_quantized(stacked):
    write = lambda p, x: qpayload.write(  # noqa: E731
        p, jnp.swapaxes(x, 1, 2), token_positions, slots, layer=layer)
    keys, values = write(stacked.keys, k), write(stacked.values, v)
  else:
    keys = put(stacked.keys, jnp.swapaxes(k, 1, 2))
    values = put(stacked.values, jnp.swapaxes(v, 1, 2))
  return LayerKV(keys=keys, values=values,
                 positions=put(stacked.positions, pos),
                 scores=put(stacked.scores, jnp.zeros(slots.shape)))
