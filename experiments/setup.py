"""Turns a resolved config into the objects a run needs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from lmcache_jax import models
from lmcache_jax.cache.policy import CachePolicy
from policies.registry import EVICTION, parse_spec


def resolve_budget(budget: float, context: int) -> int:
  """``budget`` in tokens (>= 1) or as a fraction of ``context`` (0 < b < 1)."""
  if budget <= 0:
    raise ValueError(f"--budget must be positive (tokens, or a fraction of the "
                     f"context below 1), got {budget}")
  tokens = int(round(budget * context)) if budget < 1 else int(budget)
  if budget >= 1 and budget != int(budget):
    raise ValueError(f"--budget {budget} is neither a whole number of tokens "
                     f"nor a fraction below 1")
  if tokens > context:
    raise ValueError(f"--budget {tokens} tokens is larger than the context "
                     f"({context}); use at most {context} or the full policy")
  return max(tokens, 1)


def make_policy(policy_config: ml_collections.ConfigDict,
                context: int) -> CachePolicy:
  """The eviction policy named in the config, with its budget resolved."""
  name, _ = parse_spec(policy_config.name)
  params = EVICTION.parameters(name)
  if "budget" not in params:
    if policy_config.budget:
      raise ValueError(f"policy {name!r} keeps every token and takes no "
                       f"--budget (got {policy_config.budget})")
    return EVICTION.make(policy_config.name)
  if not policy_config.budget:
    raise ValueError(f"policy {name!r} needs --budget (tokens, or a fraction "
                     f"of the context such as 0.25)")
  return EVICTION.make(policy_config.name,
                       budget=resolve_budget(policy_config.budget, context))


def load_model(config: ml_collections.ConfigDict) -> models.LoadedModel:
  dtype = None if config.dtype == "auto" else jnp.dtype(config.dtype)
  return models.load(config.model, dtype, seed=config.seed)


def make_quant(config: ml_collections.ConfigDict, lm: models.LoadedModel):
  """The quantization plan the config asks for, or None for full precision."""
  if config.quant.kv_bits >= 16 and not config.quant.plan:
    return None
  from lmcache_jax import quant
  return quant.from_config(config.quant, lm)


def make_store(config: ml_collections.ConfigDict, lm: models.LoadedModel):
  """The prefix store the config asks for, or None."""
  store_config = config.get("store")
  if store_config is None or not store_config.get("enabled", False):
    return None
  from lmcache_jax import store
  return store.from_config(store_config, lm)
