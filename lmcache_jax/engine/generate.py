"""Generation: prefill the prompts, then decode token by token."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy, KeepAll
from lmcache_jax.engine import buckets, room, steps
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling, sample

# Called as on_token(step, tokens [B], active [B]) after every decode step.
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


@dataclasses.dataclass
class Generation:
  """What ``generate`` returns."""
  tokens: list[list[int]]          # new tokens per sequence (EOS included)
  finished: list[bool]             # stopped on EOS rather than length
  cache: KVCache
  prompt_logits: jax.Array         # [B, V] logits after the prompt


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
  if not prompts:
    raise ValueError("no prompts given: pass at least one token list")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside the "
                       f"vocabulary [0, {vocab_size})")


def checked_capacity(lm: LoadedModel, prompts: list[list[int]],
                     max_new_tokens: int, policy: CachePolicy,
                     capacity: int | None, chunk: int) -> int:
  """The cache slots a generation needs (``capacity``, or by default what
  the policy asks for, in a bucket's size: ``engine.buckets``), after
  checking the prompts and the request."""
  cfg = lm.cfg
  check_prompts(prompts, cfg.vocab_size)
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  context = max(len(p) for p in prompts) + max_new_tokens
  needed = policy.cache_capacity(context, chunk, max_new_tokens)
  if capacity is not None and capacity < needed:
    raise ValueError(
        f"a context of {context} tokens (longest prompt + max_new_tokens) needs "
        f"{needed} cache slots under policy {policy.name!r}, but the capacity "
        f"is {capacity}; raise the capacity or choose an evicting policy")
  if isinstance(policy, KeepAll) and context > cfg.max_context:
    raise ValueError(f"a context of {context} tokens exceeds the model's "
                     f"maximum of {cfg.max_context} for {cfg.name!r}")
  if capacity is None:
    return buckets.cache_capacity(policy, context, chunk, max_new_tokens)
  return capacity


def generate(lm: LoadedModel, prompts: list[list[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(),
             key: jax.Array | None = None, policy: CachePolicy = KeepAll(),
             capacity: int | None = None, prefill_chunk: int = 512,
             stop_tokens: tuple[int, ...] | None = None,
             on_token: TokenCallback | None = None,
             new_cache: Callable[[int, int], KVCache] | None = None
             ) -> Generation:
  """Generates up to ``max_new_tokens`` after each prompt (a ragged batch).

  Args:
    capacity: cache slots per sequence; by default what the policy needs for
      the longest prompt plus ``max_new_tokens``, rounded up to a bucket
      where that changes nothing (``engine.buckets.cache_capacity``).
    stop_tokens: ids that end a sequence; default the model's EOS ids.
    on_token: streaming callback, see ``TokenCallback``.
    new_cache: builds an empty cache (batch, capacity), e.g. a quantized
      one; default full precision in the model's dtype.
  """
  cfg = lm.cfg
  capacity = checked_capacity(lm, prompts, max_new_tokens, policy, capacity,
                              prefill_chunk)
  cache = (init_cache(cfg, len(prompts), capacity, lm.dtype) if new_cache is None
           else new_cache(len(prompts), capacity))
  logits, cache = prefill(lm, cache, prompts, policy, prefill_chunk)
  return decode(lm, cache, logits, max_new_tokens=max_new_tokens,
                sampling=sampling, key=key, policy=policy,
                stop_tokens=stop_tokens, on_token=on_token)


def decode(lm: LoadedModel, cache: KVCache, prompt_logits: jax.Array, *,
           max_new_tokens: int, sampling: Sampling = Sampling(),
           key: jax.Array | None = None, policy: CachePolicy = KeepAll(),
           stop_tokens: tuple[int, ...] | None = None,
           on_token: TokenCallback | None = None) -> Generation:
  """Decodes after a prefilled cache whose last logits are ``prompt_logits`` [B, V].

  Separate from ``generate`` so that callers that build the cache another way
  (a prefix loaded from a store, a restored session) share the loop. Without
  ``on_token`` the whole loop runs on the device (``steps.decode_loop``);
  with it, one jitted step per token, so each token reaches the callback.

  Raises ValueError before the first step where the cache has no room for
  ``max_new_tokens - 1`` more tokens (the last is sampled, never fed) in a
  sequence that has not stopped (``engine.room.check_decode``).
  """
  policy = policy.bind(lm.cfg).decoding()
  cache = policy.prepare(cache)
  stop = np.array(lm.cfg.eos_token_ids if stop_tokens is None else stop_tokens,
                  np.int32)
  key = jax.random.key(0) if key is None else key
  key, sub = jax.random.split(key)
  first = np.asarray(sample(prompt_logits, sub, sampling))
  room.check_decode(cache, policy, ~np.isin(first, stop), max_new_tokens - 1)
  if on_token is None:
    new, cache = _decode_on_device(lm, cache, first, key, stop, max_new_tokens,
                                   policy, sampling)
  else:
    new, cache = _decode_streaming(lm, cache, first, key, stop, max_new_tokens,
                                   policy, sampling, on_token)
  outputs = [[int(t) for t in row if t >= 0] for row in new]
  finished = [bool(row) and row[-1] in stop for row in outputs]
  return Generation(outputs, finished, cache, prompt_logits)


def _decode_on_device(lm, cache, first, key, stop, max_new_tokens, policy,
                      sampling):
  """[B, max_new_tokens] tokens (-1 after a stop) and the cache."""
  new = np.full((len(first), max(max_new_tokens, 1)), -1, np.int32)
  new[:, 0] = first
  active = ~np.isin(first, stop)
  if max_new_tokens > 1 and active.any():
    rest, cache = steps.decode_loop(
        lm.graphdef, lm.params, cache, jnp.asarray(first), jnp.asarray(active),
        key, jnp.asarray(stop), num_steps=max_new_tokens - 1, policy=policy,
        sampling=sampling)
    new[:, 1:] = np.asarray(rest)
  return new[:, :max_new_tokens], cache


def _decode_streaming(lm, cache, first, key, stop, max_new_tokens, policy,
                      sampling, on_token: TokenCallback):
  """Like ``_decode_on_device``, one host step per token for ``on_token``."""
  new = np.full((len(first), max_new_tokens), -1, np.int32)
  tokens, active = first, np.ones(len(first), bool)
  for step in range(max_new_tokens):
    new[active, step] = tokens[active]
    on_token(step, tokens.copy(), active.copy())
    active = active & ~np.isin(tokens, stop)
    if step == max_new_tokens - 1 or not active.any():
      break
    key, sub = jax.random.split(key)
    tokens, _, cache = steps.decode_step(
        lm.graphdef, lm.params, cache, jnp.asarray(tokens),
        jnp.asarray(active), sub, policy=policy, sampling=sampling)
    tokens = np.asarray(tokens)
  return new, cache
