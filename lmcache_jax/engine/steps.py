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

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.engine.sampling import Sampling, sample


def uses_mass(policy: CachePolicy) -> bool:
  """Whether the policy scores with attention mass (else attention skips it)."""
  return getattr(policy, "uses_attention_mass", True)


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "logits_for"),
                   donate_argnames=("cache",))
def forward(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
            tokens: jax.Array, num_new: jax.Array, *, policy: CachePolicy,
            logits_for: str = "all"):
  """Feeds ``tokens`` [B, T] (``num_new[b]`` real, right-padded) into the cache.

  Returns (logits, cache): logits [B, T, V] for "all", [B, V] at each
  sequence's last real token for "last".
  """
  model = nnx.merge(graphdef, params)
  step = policy.plan(cache, num_new, tokens.shape[1])
  logits, cache, mass = model(tokens, cache, step, logits_for=logits_for,
                              with_mass=uses_mass(policy))
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
                              with_mass=uses_mass(policy))
  cache = policy.update(cache, mass, step)
  return sample(logits, key, sampling), logits, cache


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
