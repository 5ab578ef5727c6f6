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
