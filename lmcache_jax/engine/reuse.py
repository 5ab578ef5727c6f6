"""Generation with a prefix store: load the cached prefix, prefill only the rest.

Time to first token falls from prefill time to transfer time for the part of
the prompt the store holds. Each prompt's new whole chunks are stored after
its prefill, and with ``store_generated`` the answer's too, so the next turn
of a conversation finds the whole previous exchange.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax

from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy, KeepAll
from lmcache_jax.engine.generate import (Generation, TokenCallback,
                                         checked_capacity, decode)
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.store.store import KVStore


@dataclasses.dataclass
class ReuseGeneration:
  """A generation plus what the store contributed."""
  generation: Generation
  hit_tokens: list[int]              # prompt tokens loaded from the store
  sources: list[dict[str, int]]      # per prompt: chunks per tier of origin
  ttft_s: float                      # call start to the prompt's logits ready
  stored_chunks: int                 # chunks this call added to the store


def check_reusable(policy: CachePolicy) -> None:
  if not isinstance(policy, KeepAll):
    raise ValueError(
        f"prefix reuse needs a cache whose slot is the token's position (the "
        f"'full' policy); policy {policy.name!r} evicts tokens, so a stored "
        f"chunk would not be the prefix's KV. Run it without a store")


def generate_with_store(
    lm: LoadedModel, prompts: list[list[int]], store: KVStore, *,
    max_new_tokens: int, sampling: Sampling = Sampling(),
    key: jax.Array | None = None, policy: CachePolicy = KeepAll(),
    capacity: int | None = None, prefill_chunk: int = 512,
    stop_tokens: tuple[int, ...] | None = None,
    on_token: TokenCallback | None = None,
    new_cache: Callable[[int, int], KVCache] | None = None,
    store_generated: bool = True) -> ReuseGeneration:
  """``engine.generate`` with prefix reuse through ``store``.

  Args:
    new_cache: builds an empty cache (batch, capacity), e.g. a quantized
      one; default ``init_cache`` in the model's dtype.
    store_generated: also store the chunks of prompt + answer, for the next
      turn of a conversation.
  """
  check_reusable(policy)
  capacity = checked_capacity(lm, prompts, max_new_tokens, policy, capacity,
                              prefill_chunk)
  if new_cache is None:
    new_cache = lambda b, s: init_cache(lm.cfg, b, s, lm.dtype)  # noqa: E731

  start = time.perf_counter()
  cache = new_cache(len(prompts), capacity)
  hits, sources = [], []
  for row, prompt in enumerate(prompts):
    # The last prompt token is always fed: its logits start the answer.
    usable = (len(prompt) - 1) // store.chunk_size * store.chunk_size
    cache, prefix = store.load_into(cache, row, prompt, usable)
    hits.append(prefix.num_tokens)
    sources.append(prefix.tier_counts())
  suffixes = [p[n:] for p, n in zip(prompts, hits)]
  logits, cache = prefill(lm, cache, suffixes, policy, prefill_chunk)
  logits = jax.block_until_ready(logits)
  ttft = time.perf_counter() - start

  stored = sum(store.store(p, cache, row) for row, p in enumerate(prompts))
  generation = decode(lm, cache, logits, max_new_tokens=max_new_tokens,
                      sampling=sampling, key=key, policy=policy,
                      stop_tokens=stop_tokens, on_token=on_token)
  if store_generated:
    for row, (prompt, answer) in enumerate(zip(prompts, generation.tokens)):
      # The last answer token was sampled but never fed, so it has no KV.
      stored += store.store(prompt + answer[:-1], generation.cache, row)
  return ReuseGeneration(generation, hits, sources, ttft, stored)
