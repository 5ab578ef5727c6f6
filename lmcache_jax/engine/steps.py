"""The jitted steps: one forward pass over new tokens, and one decode step.

The model is split once into a static graph and its parameters; the cache is
donated, so XLA updates it in place. The policy and sampling settings are
static (frozen dataclasses); lengths and token counts are arrays, so new
prompt lengths do not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lmcache_jax.attention import Request
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.cache.step import Span
from lmcache_jax.engine.sampling import Sampling, sample


def uses_mass(policy: CachePolicy) -> bool:
  """Whether the policy scores with attention mass (else attention skips it)."""
  return getattr(policy, "uses_attention_mass", True)


def attention_request(policy: CachePolicy, empty_cache: bool = False) -> Request:
  """What attention must report for ``policy``: no mass, the mass of its
  observation window's queries, of the last query, or of every query."""
  if not uses_mass(policy):
    return Request(empty_cache=empty_cache, mass_queries=0)
  observe = getattr(policy, "observe", "all")
  voters = {"window": max(getattr(policy, "window", 0), 1), "last": 1}
  return Request(empty_cache=empty_cache, mass_queries=voters.get(observe))


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "logits_for",
                                             "empty_cache"),
                   donate_argnames=("cache",))
def forward(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
            tokens: jax.Array, num_new: jax.Array, prompt: Span | None = None,
            *, policy: CachePolicy, logits_for: str = "all",
            empty_cache: bool = False):
  """Feeds ``tokens`` [B, T] (``num_new[b]`` real, right-padded) into the cache.

  ``prompt``: the span of the prompt a prefill is feeding (see
  ``CachePolicy.plan``). ``empty_cache``: the caller knows no sequence holds
  a token yet (the first chunk of a prefill), so attention skips the cached
  slots.

  Returns (logits, cache): logits [B, T, V] for "all", [B, V] at each
  sequence's last real token for "last".
  """
  model = nnx.merge(graphdef, params)
  step = policy.plan(cache, num_new, tokens.shape[1], prompt)
  logits, cache, mass = model(tokens, cache, step, logits_for=logits_for,
                              request=attention_request(policy, empty_cache))
  return logits, policy.update(cache, mass, step)


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "sampling"),
                   donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
                tokens: jax.Array, active: jax.Array, key: jax.Array, *,
                policy: CachePolicy, sampling: Sampling):
  """Feeds one token per sequence and draws the next.

  Args:
    tokens: [B] int32, the last token of each sequence.
    active: [B] bool; finished sequences write nothing.
    key: PRNG key for sampling.

  Returns:
    (next tokens [B] int32, logits [B, V] float32, cache).
  """
  model = nnx.merge(graphdef, params)
  num_new = active.astype(jnp.int32)
  step = policy.plan(cache, num_new, 1)
  logits, cache, mass = model(tokens[:, None], cache, step, logits_for="last",
                              request=attention_request(policy))
  cache = policy.update(cache, mass, step)
  return sample(logits, key, sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "sampling",
                                             "num_steps"),
                   donate_argnames=("cache",))
def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
                tokens: jax.Array, active: jax.Array, key: jax.Array,
                stop_tokens: jax.Array, *, num_steps: int,
                policy: CachePolicy, sampling: Sampling):
  """Up to ``num_steps`` decode steps on the device, with no host round trip.

  Args:
    tokens: [B] int32, the last sampled token of each sequence (not yet fed).
    active: [B] bool; a sequence stops after sampling one of ``stop_tokens``.
    stop_tokens: [E] int32 ids that end a sequence.

  Returns:
    (new tokens [B, num_steps] int32, -1 after a sequence stopped; cache).
    The loop ends early once every sequence has stopped.
  """
  batch = tokens.shape[0]
  out = jnp.full((batch, num_steps), -1, jnp.int32)

  def more(carry):
    i, _, _, active, _, _ = carry
    return (i < num_steps) & jnp.any(active)

  def step(carry):
    i, cache, tokens, active, key, out = carry
    key, sub = jax.random.split(key)
    tokens, _, cache = decode_step.__wrapped__(
        graphdef, params, cache, tokens, active, sub, policy=policy,
        sampling=sampling)
    out = out.at[:, i].set(jnp.where(active, tokens, -1))
    active = active & ~jnp.isin(tokens, stop_tokens)
    return i + 1, cache, tokens, active, key, out

  _, cache, _, _, _, out = jax.lax.while_loop(
      more, step, (jnp.int32(0), cache, tokens, active, key, out))
  return out, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "policy"),
                   donate_argnames=("cache",))
def forward_nll(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
                tokens: jax.Array, num_new: jax.Array, targets: jax.Array, *,
                policy: CachePolicy):
  """Like ``forward``, but returns the negative log-likelihood [B, T] of
  ``targets`` (the next tokens) instead of logits, so the vocabulary-sized
  logits never leave the device."""
  logits, cache = forward.__wrapped__(graphdef, params, cache, tokens, num_new,
                                      policy=policy, logits_for="all")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return nll, cache
