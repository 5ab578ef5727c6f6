"""The contract between the engine and a cache-management policy.

A policy decides where new tokens go (``plan``) and what happens to the cache
after the model has attended (``update``: accumulate scores, evict). It is a
frozen dataclass, hence hashable, so jitted steps specialise on it.

Prefill of a prompt that fits in the cache runs under ``deferring()`` (score,
do not evict) and ends with ``after_prefill`` (compress once, with the whole
prompt seen); the prefill passes the prompt's ``Span`` to every ``plan`` so
that an observation window at the prompt's end spans chunks. Decoding, and
any token fed after a prompt's compression, runs under ``decoding()``: the
policy's decode-time eviction mode (``decode_mode``). ``bind`` gives a
policy the model facts it needs (RoPE, to re-rotate kept keys), and
``prepare`` gives a cache the state the policy keeps beside its slots.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Span, Step, append_step
from lmcache_jax.arch.config import ModelConfig


class CachePolicy(Protocol):
  name: str
  decode_mode: str   # when it evicts while decoding, in words (for results)

  def cache_capacity(self, context: int, chunk: int,
                     new_tokens: int = 0) -> int:
    """Slots per (layer, sequence, head) for a run of ``context`` tokens fed
    at most ``chunk`` at a time, of which ``new_tokens`` come after the
    prompt (decoded, or fed under ``decoding()``)."""

  def plan(self, cache: KVCache, num_new: jax.Array, num_tokens: int,
           prompt: Span | None = None) -> Step:
    """Positions and slots for the next ``num_tokens`` (``num_new[b]`` real);
    ``prompt``: the span of the prompt a prefill is feeding (None: the step
    stands alone, as when decoding)."""

  def update(self, cache: KVCache, mass: jax.Array, step: Step) -> KVCache:
    """The cache after a forward pass; ``mass`` [L, B, K, S] is the attention
    each slot received from the step's weighted queries (None for a policy
    whose class sets ``uses_attention_mass = False``)."""

  def bind(self, cfg: ModelConfig) -> "CachePolicy":
    """This policy specialised to a model (idempotent)."""

  def deferring(self) -> "CachePolicy":
    """The policy to prefill a prompt with when the whole prompt fits."""

  def decoding(self) -> "CachePolicy":
    """The policy to decode with (idempotent): its decode-time eviction mode,
    the newest token always kept."""

  def after_prefill(self, cache: KVCache) -> KVCache:
    """The cache after a deferred prefill (e.g. compressed to a budget)."""

  def prepare(self, cache: KVCache) -> KVCache:
    """The cache with any state the policy keeps beside its slots (sink
    origins, to re-assign positions), added before the first step so that
    every jitted step and the decode loop see one cache structure."""


@dataclasses.dataclass(frozen=True)
class KeepAll:
  """Keeps every token: slot = position, nothing is ever evicted."""
  name: ClassVar[str] = "full"
  uses_attention_mass: ClassVar[bool] = False
  decode_mode: ClassVar[str] = "never"

  def cache_capacity(self, context: int, chunk: int,
                     new_tokens: int = 0) -> int:
    del chunk, new_tokens
    return context

  def plan(self, cache: KVCache, num_new: jax.Array, num_tokens: int,
           prompt: Span | None = None) -> Step:
    del prompt
    return append_step(cache, num_new, num_tokens)

  def update(self, cache: KVCache, mass: jax.Array, step: Step) -> KVCache:
    del mass, step
    return cache

  def bind(self, cfg: ModelConfig) -> KeepAll:
    del cfg
    return self

  def deferring(self) -> KeepAll:
    return self

  def decoding(self) -> KeepAll:
    return self

  def after_prefill(self, cache: KVCache) -> KVCache:
    return cache

  def prepare(self, cache: KVCache) -> KVCache:
    return cache
