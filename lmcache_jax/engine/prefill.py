"""Chunked prefill of a ragged batch of prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.cache.step import prompt_span
from lmcache_jax.engine import room, steps
from lmcache_jax.engine.buckets import bucket
from lmcache_jax.models.loaded import LoadedModel


def pad_batch(sequences: list[list[int]], width: int | None = None,
              pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into [B, width] int32 and returns their lengths."""
  lengths = np.array([len(s) for s in sequences], np.int32)
  width = int(lengths.max()) if width is None else width
  tokens = np.full((len(sequences), width), pad_id, np.int32)
  for row, seq in zip(tokens, sequences):
    row[:len(seq)] = seq
  return tokens, lengths


def prefill(lm: LoadedModel, cache: KVCache, prompts: list[list[int]],
            policy: CachePolicy, chunk: int | None = 512
            ) -> tuple[jax.Array, KVCache]:
  """Feeds each prompt into its sequence of ``cache``, ``chunk`` tokens at a time.

  A chunk attends to itself with flash attention and to the slots cached
  before it (``lmcache_jax.attention``); a chunk into an empty cache skips
  the second part, so ``chunk=None`` (the whole prompt in one pass) is the
  fastest prefill. Smaller chunks bound the activations and, for evicting
  policies, the extra slots a chunk needs. Every chunk has the same shape,
  so at most two compilations (the first chunk, the others) serve them all;
  prompts shorter than a chunk are padded to a bucket's width
  (``engine.buckets``), so their lengths share programs too.

  When every prompt fits in the free slots, the policy only scores during the
  chunks and compresses once at the end (``after_prefill``: SnapKV's
  observation window is then the prompt's last queries, over all of it);
  otherwise the prompt streams through the cache, evicting after each chunk.

  Returns the logits [B, V] after each prompt's last token, and the cache.
  Raises ValueError, before the pass that would, where a token would find no
  slot in the cache (``engine.room``).
  """
  tokens, lengths = pad_batch(prompts)
  policy = policy.bind(lm.cfg)
  cache = policy.prepare(cache)
  room.check_prompts(cache, policy, lengths)
  live = room.fullest_rows(cache)
  fits = bool(np.all(live + lengths <= cache.capacity))
  chunk_policy = policy.deferring() if fits else policy
  # a deferred prompt's observation window may span its chunks
  span = prompt_span(cache, lengths) if fits else None
  longest = tokens.shape[1]
  width = padded_width(longest, cache.capacity)
  chunk = width if chunk is None else max(1, min(chunk, width))
  num_chunks = -(-longest // chunk)
  empty = not live.any()
  tokens = np.pad(tokens, ((0, 0), (0, num_chunks * chunk - longest)))
  last_logits = None
  for c in range(num_chunks):
    start = c * chunk
    num_new = np.clip(lengths - start, 0, chunk).astype(np.int32)
    if not fits:   # the prompt streams: rows fill up and evict pass by pass
      room.check_pass(cache, chunk_policy, num_new)
    logits, cache = steps.forward(
        lm.graphdef, lm.params, cache, jnp.asarray(tokens[:, start:start + chunk]),
        jnp.asarray(num_new), span, policy=chunk_policy, logits_for="last",
        empty_cache=empty and c == 0)
    has_tokens = jnp.asarray(num_new > 0)[:, None]
    last_logits = logits if last_logits is None else jnp.where(
        has_tokens, logits, last_logits)
  if fits:
    cache = policy.after_prefill(cache)
  return last_logits, cache


def padded_width(width: int, capacity: int) -> int:
  """The width of a prompt batch whose longest prompt has ``width`` tokens:
  its bucket, but no more than a cache of ``capacity`` slots can take in
  one pass (an evicting policy places a pass's tokens in free slots)."""
  return min(bucket(width), max(width, capacity))
