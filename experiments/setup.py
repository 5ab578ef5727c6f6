"""Turns a resolved config into the objects a run needs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from lmcache_jax import models
from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.data import shakespeare
from lmcache_jax.engine import calibration
from lmcache_jax.quant import QuantPlan
from lmcache_jax.store import (DeviceTier, DiskTier, HostTier, KVStore, Layout,
                               load_cipher, model_fingerprint)
from policies.registry import CALIBRATION, EVICTION, REPLACEMENT, parse_spec


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
  return quant_plan(config.quant, lm)


def make_store(config: ml_collections.ConfigDict, lm: models.LoadedModel,
               cache: KVCache | None = None) -> KVStore | None:
  """The prefix store ``config.store`` asks for, for ``lm``'s caches (or ones
  shaped like ``cache``); None if it is not enabled.

  Fields of ``config.store`` (defaults in ``configs/default.py``):
  ``tiers`` (a comma list of device, host, disk; used fastest first),
  ``chunk_size`` (tokens), ``device_mib`` / ``host_mib`` / ``disk_mib``
  (capacities), ``dir`` (the disk tier's directory), ``replacement`` (a rule
  of ``policies/replacement``: lru, lfu, fifo; each tier gets its own), and
  ``key_file`` or ``key_env`` (an AES-256 key: seals host and disk chunks).
  """
  store_config = config.get("store")
  if store_config is None or not store_config.get("enabled", False):
    return None
  valid = ("device", "host", "disk")  # fastest first
  names = [t.strip() for t in str(store_config.tiers).split(",") if t.strip()]
  if not names or set(names) - set(valid):
    raise ValueError(f"config.store.tiers={store_config.tiers!r}: give a comma "
                     f"list of {', '.join(valid)}")
  rule = store_config.get("replacement", "lru")
  tiers = []
  for name in (n for n in valid if n in names):
    mib = store_config[f"{name}_mib"]
    if not isinstance(mib, int) or mib <= 0:
      raise ValueError(f"config.store.{name}_mib={mib!r}: give the {name} "
                       f"tier's capacity as a positive whole number of MiB")
    capacity, replacement = mib * 2**20, REPLACEMENT.make(rule)
    if name != "disk":
      memory_tier = DeviceTier if name == "device" else HostTier
      tiers.append(memory_tier(capacity, replacement))
    elif not store_config.dir:
      raise ValueError("config.store.dir is empty: the disk tier needs a "
                       "directory (or leave disk out of config.store.tiers)")
    else:
      tiers.append(DiskTier(store_config.dir, capacity, replacement))
  chunk_size = int(store_config.chunk_size)
  if cache is None:
    cache = init_cache(lm.cfg, 1, max(chunk_size, 1), lm.dtype)
  return KVStore(Layout.of(cache), tiers,
                 model_fingerprint=model_fingerprint(lm), chunk_size=chunk_size,
                 cipher=load_cipher(store_config.get("key_file", ""),
                                    store_config.get("key_env", "")))


def calibration_text_tokens(quant_config, lm):
  """Token ids of the config's calibration text (``calibration_text``, a
  Shakespeare work, default ``macbeth``; first ``calibration_tokens`` = 512)."""
  if lm.tokenizer is None:
    raise ValueError(
        f"model {lm.cfg.name} has no tokenizer to read calibration text "
        f"(key centering and the measuring policies need it); pass "
        f"calibration_tokens, or use --config.quant.center_keys=False with "
        f"--calibration=uniform")
  get = quant_config.get
  text = shakespeare.load_text(get("calibration_text", "macbeth") or "macbeth")
  return lm.tokenizer.encode(text)[:int(get("calibration_tokens", 512) or 512)]


def quant_plan(quant_config, lm, calibration_tokens=None) -> QuantPlan | None:
  """The quant plan a run asks for, or None for a full-precision cache.

  Fields of ``quant_config`` (a ConfigDict or dict): ``plan`` (path of a
  saved plan; wins over the rest), ``kv_bits`` (16 = off, else the average
  code bits), ``calibration`` (a policy name or call string, e.g.
  ``kvquant(sink_tokens=4)``), ``group_size`` (64), ``residual`` (0),
  ``sinks`` (0), ``copy_bits`` (16; 8 holds the sink and recent copies as
  int8 codes), ``rotate`` (True: Hadamard-rotate head vectors),
  ``center_keys`` (True: subtract each key channel's mean on the
  calibration text) and ``save_plan`` (path to save the chosen plan).
  ``calibration_tokens`` is real text (token ids) for centering and for
  policies that measure; None reads ``calibration_text`` (see
  ``calibration_text_tokens``).
  """
  get = quant_config.get
  if get("plan", ""):
    plan = QuantPlan.load(get("plan"), lm.cfg)
    print(f"loaded quant plan {get('plan')}: {plan.describe()}")
    return plan
  bits = float(get("kv_bits", 16))
  if bits >= 16:
    return None
  policy = CALIBRATION.make(get("calibration", "uniform") or "uniform")
  center = bool(get("center_keys", True))
  # what the model produced on calibration text: read once, for centering
  # and for the policies that measure
  acts = None
  if center or policy.name != "uniform":
    if calibration_tokens is None:
      calibration_tokens = calibration_text_tokens(quant_config, lm)
    acts = calibration.collect(lm, calibration_tokens)
  storage = calibration.Storage(
      rotate=bool(get("rotate", True)),
      key_shift=calibration.key_means(acts) if center else None)
  plan = policy.calibrate(lm, acts, bits=bits,
                          group_size=int(get("group_size", 64)),
                          residual=int(get("residual", 0)),
                          sinks=int(get("sinks", 0)), storage=storage)
  plan = plan.replace(copy_bits=int(get("copy_bits", 16)))
  print(plan.describe())
  if get("save_plan", ""):
    print(f"saved quant plan to {plan.save(get('save_plan'))}")
  return plan
