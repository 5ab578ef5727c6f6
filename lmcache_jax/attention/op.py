"""The attention op: the one call the model makes for attention over the cache.

``attend`` writes a layer's new keys and values into the stacked cache and
attends, choosing the implementation by phase, cache format and backend:

  phase    format  backend   implementation
  prefill  dense   any       the chunk's causal self-attention (cuDNN flash
                             attention on GPUs, ``flash``), merged exactly by
                             log-sum-exp with attention over the slots cached
                             before the chunk (skipped when the cache was
                             empty): flash over the gathered occupied slots on
                             GPUs, blocked attention elsewhere
  decode   dense   GPU       split-K Pallas kernel reading the stacked cache in
                             place (``kernels.stacked_decode``)
  decode   dense   other     dense XLA over the layer (``slots``)
  prefill  packed  any       ``packed_prefill``: each query reads its sinks
                             and latest ``residual`` tokens exact and older
                             ones as stored, as decoding would
  decode   packed  any       ``packed``: the fused int kernel reading the
                             layer's codes in place (the dequantized layer
                             when the plan keeps outliers or keys per
                             channel, KIVI)
  any step that must report attention mass to the policy: the mass comes
  from a separate blocked pass over the written layer, for the queries the
  policy asks about (``Request.mass_queries``)

No path materializes a [chunk x capacity] float32 score matrix except the
dense XLA ones (decode, small caches, the CPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmcache_jax.attention import flash
from lmcache_jax.attention.blocked import (block_size_for, blocked_attend,
                                           blocked_mass)
from lmcache_jax.attention.layer import (LayerKV, is_quantized, layer_of,
                                         matmul_precision, write_stacked)
from lmcache_jax.attention.packed import attend_packed_decode
from lmcache_jax.attention.packed_prefill import attend_packed_prefill
from lmcache_jax.attention.slots import attend_slots
from lmcache_jax.cache.step import Step
from lmcache_jax.kernels import backend
from lmcache_jax.kernels.stacked_decode import (block_for,
                                                stacked_decode_attention)
from lmcache_jax.quant import payload as qpayload

_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Request:
  """Static facts about a step that decide how it attends (jit specializes).

  empty_cache: no sequence held a cached token before this step, so a
    prefill chunk attends only to itself.
  mass_queries: how many of the step's latest weighted queries report the
    attention mass each slot received: 0 = none (the policy needs no mass),
    None = every query.
  """
  empty_cache: bool = False
  mass_queries: int | None = 0


def attend(q: jax.Array, k: jax.Array, v: jax.Array, stacked: LayerKV,
           layer: jax.Array, step: Step, request: Request = Request()
           ) -> tuple[jax.Array, LayerKV, jax.Array | None]:
  """Writes this step's k, v [B, T, K, Hd] into layer ``layer`` of the
  stacked cache and attends with the rotated queries q [B, T, N, Hd].

  Returns out [B, T, N, Hd] in q's dtype (zeros for padding queries), the
  stacked cache, and the mass [B, K, S] float32 (None when not requested).
  """
  positions = step.positions
  slots = step.slots
  with_mass = request.mass_queries != 0
  if is_quantized(stacked) and q.shape[1] > 1:
    before = None if request.empty_cache else layer_of(stacked, layer)
    stacked = write_stacked(stacked, layer, k, v, positions, slots)
    out, mass = attend_packed_prefill(q, k, v, before,
                                      layer_of(stacked, layer), step,
                                      with_mass)
    return out, stacked, mass
  if q.shape[1] == 1 and is_quantized(stacked) and not (
      qpayload.has_outliers(stacked.keys) or qpayload.has_outliers(stacked.values)):
    stacked = write_stacked(stacked, layer, k, v, positions, slots)
    out, mass = attend_packed_decode(q, stacked, positions, step.query_weights,
                                     with_mass, layer_index=layer)
    return out, stacked, mass
  if q.shape[1] == 1 and (is_quantized(stacked)
                          or not _decode_kernel(q, stacked, with_mass)):
    stacked = write_stacked(stacked, layer, k, v, positions, slots)
    out, mass = attend_slots(q, layer_of(stacked, layer), positions,
                             step.query_weights, with_mass)
    return out, stacked, mass
  if q.shape[1] == 1:
    stacked = write_stacked(stacked, layer, k, v, positions, slots)
    return _decode(q, stacked, layer, positions), stacked, None
  before = None if request.empty_cache else layer_of(stacked, layer)
  out, lse = flash.self_attention(q, k, v, jnp.sum(positions >= 0, axis=1))
  if before is not None:
    out, lse = flash.merge(out, lse, *_cached_part(q, before, positions))
  stacked = write_stacked(stacked, layer, k, v, positions, slots)
  mass = (_mass(q, lse, layer_of(stacked, layer), step, request.mass_queries)
          if with_mass else None)
  return out.astype(q.dtype), stacked, mass


def _cached_part(q, before: LayerKV, positions):
  """A prefill chunk's attention over the slots cached before it: flash
  attention over the occupied slots where flash runs (cuDNN) and every cached
  token precedes the row's queries (always, as positions grow), else blocked
  attention with a per-query visibility test."""
  block = block_size_for(before.keys.shape[2]) or before.keys.shape[2]

  def blocked():
    return blocked_attend(q, before.keys, before.values, before.positions,
                          positions, block=block,
                          precision=matmul_precision(q.dtype))

  if flash.implementation(q.dtype) != "cudnn":
    return blocked()
  first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max),
                  axis=1)
  in_order = ~jnp.any(before.positions >= first[:, None, None])
  return jax.lax.cond(
      in_order, lambda: flash.cached_attention(q, before.keys, before.values,
                                               before.positions, positions),
      blocked)


def _decode_kernel(q: jax.Array, stacked: LayerKV, with_mass: bool) -> bool:
  """Whether a dense decode step runs the in-place kernel: on GPUs (or in
  interpret mode) for 16-bit queries, when no mass is needed (the kernel
  returns no per-slot logits) and a block of slots divides the capacity."""
  return (not with_mass and jnp.dtype(q.dtype) in _KERNEL_DTYPES
          and block_for(stacked.keys.shape[3]) is not None
          and (jax.default_backend() == "gpu" or backend.interpreting()))


def _decode(q, stacked: LayerKV, layer, positions):
  batch, _, num_heads, head_dim = q.shape
  num_kv = stacked.keys.shape[2]
  capacity = stacked.keys.shape[3]
  pos = jax.lax.dynamic_index_in_dim(stacked.positions, layer, keepdims=False)
  # Every occupied slot lies below its row's limit: the kernel skips the rest.
  limit = jnp.max(jnp.where(pos >= 0, jnp.arange(1, capacity + 1), 0), axis=-1)
  qg = q[:, 0].reshape(batch, num_kv, num_heads // num_kv, head_dim)
  out, _ = stacked_decode_attention(qg, positions[:, 0], stacked.positions,
                                    stacked.keys, stacked.values, layer, limit,
                                    block_s=block_for(capacity))
  return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype)


def _mass(q, lse, layer: LayerKV, step: Step, mass_queries: int | None):
  """The attention mass of the step's latest ``mass_queries`` weighted
  queries (all when None), from their log-sum-exp: one blocked pass."""
  weights = step.query_weights
  query_positions = step.positions
  if mass_queries is not None and mass_queries < q.shape[1]:
    t = jnp.arange(q.shape[1])
    _, pick = jax.lax.top_k(jnp.where(weights > 0, t + 1, 0), mass_queries)
    take = lambda a: jnp.take_along_axis(  # noqa: E731
        a, pick.reshape(*pick.shape, *([1] * (a.ndim - 2))), axis=1)
    q, lse, weights, query_positions = map(take, (q, lse, weights,
                                                  query_positions))
  capacity = layer.keys.shape[2]
  return blocked_mass(q, lse, layer.keys, layer.positions, query_positions,
                      weights, block=block_size_for(capacity) or capacity,
                      precision=matmul_precision(q.dtype))
