"""A prefill chunk's causal attention to its own fresh keys and values.

``jax.nn.dot_product_attention`` runs it: cuDNN flash attention on GPUs for
16-bit inputs (never a [T, T] score matrix), XLA elsewhere. It returns the
log-sum-exp too, so the result merges exactly with attention over the slots
cached before the chunk (``merge``).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from lmcache_jax.kernels import backend
from lmcache_jax.kernels.masking import MASKED

_FLASH_DTYPES = (jnp.bfloat16, jnp.float16)


def implementation(dtype) -> str:
  """"cudnn" on GPUs for 16-bit inputs, else "xla" (named once in the log
  on a GPU, where it materializes the chunk's scores)."""
  if jax.default_backend() != "gpu":
    return "xla"
  if jnp.dtype(dtype) in _FLASH_DTYPES:
    return "cudnn"
  backend.note("flash_attention", f"cuDNN flash attention takes bfloat16 or "
               f"float16, not {jnp.dtype(dtype).name}; running XLA attention")
  return "xla"


def self_attention(q, k, v, lengths):
  """Causal attention of q [B, T, N, Hd] over k, v [B, T, K, Hd].

  ``lengths`` [B]: the real tokens of each row (the rest is padding). Returns
  out [B, T, N, Hd] in q's dtype and lse [B, T, N] float32; padding rows are
  zero with lse MASKED.
  """
  lengths = lengths.astype(jnp.int32)
  # float32 inputs get float32 products (XLA would use TF32 on GPUs)
  exact = (jax.default_matmul_precision("highest")
           if jnp.dtype(q.dtype) == jnp.float32 else contextlib.nullcontext())
  with exact:
    out, lse = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation(q.dtype), return_residual=True)
  real = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[..., None]
  return (jnp.where(real[..., None], out, 0).astype(q.dtype),
          jnp.where(real, lse.astype(jnp.float32), MASKED))


def merge(out_a, lse_a, out_b, lse_b):
  """Attention over the union of two disjoint key sets, from each set's
  normalized output [..., Hd] and log-sum-exp [...] (MASKED = empty set)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  some = lse > MASKED / 2
  wa = jnp.where(some, jnp.exp(lse_a - lse), 0.0)[..., None]
  wb = jnp.where(some, jnp.exp(lse_b - lse), 0.0)[..., None]
  out = out_a.astype(jnp.float32) * wa + out_b.astype(jnp.float32) * wb
  return out, jnp.where(some, lse, MASKED)


def cached_attention(q, keys, values, positions, query_positions, *,
                     implementation_name: str | None = None):
  """Attention of a prefill chunk's queries q [B, T, N, Hd] over cached slots
  keys/values [B, K, S, Hd] (positions [B, K, S], -1 = empty).

  Contract: every cached token precedes every query of its row, so each
  query sees all its row's occupied slots (the caller checks; see
  ``attention.op``). Each kv head's occupied slots are gathered to the front
  of its row, so holes and slot order do not matter, and the kv heads are
  folded into the batch: flash attention then masks the rest by per-row
  lengths alone, with no [T, S] mask. Real queries come first in ``q`` (right
  padding, query position -1). Returns out [B, T, N, Hd] in q's dtype and
  lse [B, T, N] float32 (0 and MASKED where nothing is visible).
  """
  batch, steps, num_heads, head_dim = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  group = num_heads // num_kv
  occupied = positions >= 0
  order = jnp.argsort(~occupied, axis=-1, stable=True)[..., None]
  fold = lambda x: jnp.take_along_axis(x, order, axis=2).reshape(  # noqa: E731
      batch * num_kv, capacity, 1, head_dim).astype(q.dtype)
  kv_lengths = jnp.sum(occupied, axis=-1).reshape(-1).astype(jnp.int32)
  q_lengths = jnp.repeat(jnp.sum(query_positions >= 0, axis=1), num_kv)
  qf = jnp.einsum("BTKGH->BKTGH", q.reshape(batch, steps, num_kv, group,
                                            head_dim))
  exact = (jax.default_matmul_precision("highest")
           if jnp.dtype(q.dtype) == jnp.float32 else contextlib.nullcontext())
  with exact:
    out, lse = jax.nn.dot_product_attention(
        qf.reshape(batch * num_kv, steps, group, head_dim), fold(keys),
        fold(values), query_seq_lengths=q_lengths.astype(jnp.int32),
        key_value_seq_lengths=kv_lengths, return_residual=True,
        implementation=implementation_name or implementation(q.dtype))
  seen = ((kv_lengths > 0)[:, None]
          & (jnp.arange(steps)[None, :] < q_lengths[:, None]))[..., None]
  out = jnp.where(seen[..., None], out, 0).reshape(batch, num_kv, steps, group,
                                                   head_dim)
  lse = jnp.where(seen, lse.astype(jnp.float32), MASKED).reshape(
      batch, num_kv, steps, group)
  return (jnp.einsum("BKTGH->BTKGH", out).reshape(q.shape).astype(q.dtype),
          jnp.einsum("BKTG->BTKG", lse).reshape(batch, steps, num_heads))
