"""Turns a resolved config into the objects a run needs."""

from __future__ import annotations

import difflib
import logging as std_logging
import pathlib

import jax.numpy as jnp
import ml_collections

from lmcache_jax import defaults, models
from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.data import shakespeare
from lmcache_jax.engine import calibration
from lmcache_jax.models.presets import get_preset
from lmcache_jax.quant import QuantPlan
from lmcache_jax.quant.plan import PLAN_FILE
from lmcache_jax.store import (DeviceTier, DiskTier, HostTier, KVStore, Layout,
                               load_cipher, model_fingerprint)
from experiments.errors import InputError, input_errors
from experiments.texts import load_eval_text
from policies.registry import CALIBRATION, EVICTION, REPLACEMENT, parse_spec


# The budget of a policy that takes one when --budget is not given: tokens,
# at most the prompt.
DEFAULT_BUDGET = defaults.BUDGET
# Tasks that read --text (or --text_file).
PROSE_TASKS = ("perplexity", "needle", "reuse", "multiturn", "ruler")
# Tasks that measure prefix reuse: they turn the store on themselves.
STORE_TASKS = ("reuse", "multiturn")
# Tasks whose prompt the model reads as text: a model without a tokenizer
# (random weights) cannot run them.
TEXT_TASKS = ("perplexity", "generate", "passkey", "needle", "reuse",
               "multiturn", "calibrate", "quant_table", "quant_spread",
               "ruler")


def resolve_budget(budget: float, context: int, limit: int | None = None) -> int:
  """``budget`` in tokens (>= 1) or as a fraction of ``context`` (0 < b < 1),
  the prompt's length; at most ``limit`` tokens (default ``context``)."""
  limit = context if limit is None else limit
  if budget <= 0:
    raise ValueError(f"--budget must be positive (tokens, or a fraction of the "
                     f"prompt below 1), got {budget}")
  tokens = int(round(budget * context)) if budget < 1 else int(budget)
  if budget >= 1 and budget != int(budget):
    raise ValueError(f"--budget {budget} is neither a whole number of tokens "
                     f"nor a fraction below 1")
  if tokens > limit:
    raise ValueError(f"--budget {tokens} tokens is larger than the context "
                     f"({limit}); use at most {limit} or the full policy")
  return max(tokens, 1)


def takes_budget(spec: str) -> bool:
  """Whether the eviction policy ``spec`` (a name or call string) has a budget."""
  return "budget" in EVICTION.parameters(parse_spec(spec)[0])


@input_errors()
def make_policy(policy_config: ml_collections.ConfigDict, prompt_tokens: int,
                limit: int | None = None) -> CachePolicy:
  """The eviction policy named in the config, with its budget resolved
  against ``prompt_tokens`` (at most ``limit`` tokens, default the prompt).
  The budget is the one given, in the spec (``snapkv(budget=64)``) or as
  ``--budget`` (two different ones are an error); a policy that takes a
  budget and got none gets ``DEFAULT_BUDGET`` tokens (at most the prompt)."""
  name, kwargs = parse_spec(policy_config.name)
  if not takes_budget(name):
    if policy_config.budget:
      raise ValueError(f"policy {name!r} keeps every token and takes no "
                       f"--budget (got {policy_config.budget})")
    return EVICTION.make(policy_config.name)
  given = _given_budget(policy_config.name, kwargs.pop("budget", None),
                        policy_config.budget)
  budget = (resolve_budget(given, prompt_tokens, limit) if given is not None
            else min(DEFAULT_BUDGET, prompt_tokens))
  return EVICTION.make(name, budget=budget, **kwargs)


def _given_budget(spec: str, in_spec, flag: float) -> float | None:
  """The budget given in the policy spec or as ``--budget`` (0 = not given);
  None if neither."""
  if in_spec is None:
    return flag or None
  if isinstance(in_spec, bool) or not isinstance(in_spec, (int, float)):
    raise ValueError(f"--policy={spec!r}: budget must be a number (tokens, or "
                     f"a fraction of the prompt below 1), got {in_spec!r}")
  if flag and float(in_spec) != flag:
    raise ValueError(f"two budgets: --policy={spec!r} says {in_spec:g} and "
                     f"--budget says {flag:g}; give one")
  return float(in_spec)


def prompt_tokens(config: ml_collections.ConfigDict) -> int | None:
  """The length of the task's prompt, which a fractional budget is taken of:
  the scored tokens, the longest retrieval prompt, the shared document or
  opening passage; None for generate (known once the prompt is tokenized)."""
  task = config.task
  if task in ("passkey", "needle", "ruler"):
    return max(int(n) for n in config[task].lengths)
  if task == "reuse":
    return int(config.reuse.doc_tokens)
  if task == "multiturn":
    return int(config.multiturn.context_tokens)
  if task == "generate":
    return None
  if task == "perplexity":
    return int(config.perplexity.num_tokens or config.context)
  return int(config.context)


def _close(word: str, options) -> str:
  match = difflib.get_close_matches(word, list(options), n=1)
  return f"; did you mean {match[0]!r}?" if match else ""


@input_errors()
def check(config: ml_collections.ConfigDict, task_names, *,
          model: bool = True) -> None:
  """Everything about a run that can be checked without weights: the task,
  the model (unless ``model`` is False: one is already loaded), context,
  bits, budget, prompt and text. Raises InputError (or FileNotFoundError)
  naming the bad value and what would be valid."""
  if config.task not in task_names:
    raise ValueError(f"unknown task name {config.task!r}"
                     f"{_close(config.task, task_names)} (--task=list shows them)")
  if model:
    _check_model(config)
  _check_run(config)


def _check_model(config: ml_collections.ConfigDict) -> None:
  model = config.model
  presets = models.known_models()
  name = model.removeprefix("random:")
  is_file = models.is_path(model)
  if not is_file and name not in presets:
    raise ValueError(f"unknown model {model!r}{_close(name, presets)}; give a "
                     f"preset ({', '.join(presets)}), a .gguf file or a "
                     f"Hugging Face folder (config.json + *.safetensors)")
  if not is_file and not model.startswith("random:") and model != models.DEFAULT_MODEL:
    raise ValueError(
        f"preset {model!r} has no weights here ({models.DEFAULT_MODEL} is the "
        f"one fetched for you); bring them as a .gguf file (--model=PATH.gguf) "
        f"or a Hugging Face folder (--model=DIR), or use --model=random:{model} "
        f"for random weights (benchmarks only: no tokenizer)")
  if model.startswith("random:") and config.task in TEXT_TASKS:
    raise ValueError(
        f"task {config.task!r} reads text and needs a tokenizer, which "
        f"{model} (random weights) has none of; use real weights (the default "
        f"model, a .gguf file or a Hugging Face folder), or time random "
        f"weights with python -m experiments.bench")
  if not is_file:
    positions = get_preset(name).max_context
    if config.context > positions:
      raise ValueError(f"--context {config.context} is more than {model} has "
                       f"positions for ({positions}); use --context={positions} "
                       f"or less")


def _check_run(config: ml_collections.ConfigDict) -> None:
  if config.context < 1:
    raise ValueError(f"--context must be a positive number of tokens, got "
                     f"{config.context}")
  bits = float(config.quant.kv_bits)
  if not config.quant.plan and bits < 16:
    calibrator = parse_spec(config.quant.calibration)[0]
    if calibrator not in CALIBRATION.names():
      raise ValueError(f"unknown calibration {calibrator!r}"
                       f"{_close(calibrator, CALIBRATION.names())}; valid: "
                       f"{', '.join(CALIBRATION.names())}")
    whole = calibrator == "uniform" and "(" not in config.quant.calibration
    if (whole and bits not in (2, 3, 4, 8)) or not 2 <= bits <= 8:
      raise ValueError(
          f"--kv_bits={bits:g} is not available"
          + (" with uniform calibration: use 2, 3, 4 or 8" if whole else
             ": use an average between 2 and 8")
          + ", or 16 for an unquantized cache")
  if config.quant.plan and not pathlib.Path(config.quant.plan).exists():
    raise FileNotFoundError(f"--quant_plan {config.quant.plan!r} does not exist")
  saved = pathlib.Path(config.quant.save_plan or ".") / PLAN_FILE
  if config.quant.save_plan and saved.exists() and not config.quant.overwrite_plan:
    raise ValueError(f"--config.quant.save_plan: {saved} already holds a quant "
                     f"plan; save to another directory, or add "
                     f"--config.quant.overwrite_plan=True to replace it")
  length = prompt_tokens(config)
  if config.policy.name != "list":
    policy = make_policy(config.policy, length or 1 << 30)
    _check_quantized_sinks(config, policy)
  if config.task == "quant_table":
    table_policies(config.quant)
  if config.task == "generate" and not str(config.generate.prompt).strip():
    raise ValueError("--prompt is empty: give the model something to respond to")
  if config.task in PROSE_TASKS:
    text = load_eval_text(config.text, config.text_file)
    if length and len(text.encode()) < length + 1:
      raise ValueError(
          f"the text holds {len(text.encode())} bytes, fewer than the "
          f"{length + 1} tokens the task reads; give a longer text or a "
          f"smaller --context")


def _check_quantized_sinks(config: ml_collections.ConfigDict,
                           policy: CachePolicy) -> None:
  """A policy that re-assigns positions (attention_sink) re-rotates its sink
  keys at every eviction; a quantized cache rotates their exact copies, so
  the plan must hold every sink exact, in the cache dtype (the cache checks
  the same when it evicts: ``EvictionPolicy.prepare``). A saved plan is
  checked there only."""
  quant = config.quant
  repositions = getattr(policy, "reposition", False)
  if not repositions or quant.plan or quant.kv_bits >= 16:
    return
  # a calibration policy with its own copy_bits (kivi) keeps it: quant_plan
  copy_bits = (getattr(CALIBRATION.make(quant.calibration), "copy_bits", None)
               or quant.copy_bits)
  fixes = []
  if quant.sinks < policy.sinks:
    fixes.append(f"--config.quant.sinks={policy.sinks} (now {quant.sinks})")
  if copy_bits != 16:
    fixes.append(f"--config.quant.copy_bits=16 (now {copy_bits})")
  if fixes:
    raise InputError(
        f"--policy={config.policy.name} re-rotates its {policy.sinks} sink keys "
        f"at every eviction, which a quantized cache does on exact copies of "
        f"them in the cache dtype: add {' and '.join(fixes)}, or use "
        f"--kv_bits=16")


def table_policies(quant_config) -> list[str]:
  """The calibration policies quant_table compares (``table_policies``, a
  comma string); an unknown one is an InputError listing the valid names."""
  listed = str(quant_config.get("table_policies", "")).split(",")
  names = [n.strip() for n in listed if n.strip()]
  unknown = [n for n in names if n not in CALIBRATION.names()]
  if unknown:
    raise InputError(
        f"--config.quant.table_policies: unknown calibration policy "
        f"{', '.join(map(repr, unknown))}"
        f"{_close(unknown[0], CALIBRATION.names())}; valid: "
        f"{', '.join(CALIBRATION.names())}")
  return names


@input_errors()   # the loaders' ValueErrors are about the model given
def load_model(config: ml_collections.ConfigDict) -> models.LoadedModel:
  dtype = None if config.dtype == "auto" else jnp.dtype(config.dtype)
  return models.load(config.model, dtype, seed=config.seed)


def make_quant(config: ml_collections.ConfigDict, lm: models.LoadedModel):
  """The quantization plan the config asks for, or None for full precision."""
  if config.quant.kv_bits >= 16 and not config.quant.plan:
    return None
  return quant_plan(config.quant, lm)


@input_errors()
def make_store(config: ml_collections.ConfigDict, lm: models.LoadedModel,
               cache: KVCache | None = None) -> KVStore | None:
  """The prefix store ``config.store`` asks for, for ``lm``'s caches (or ones
  shaped like ``cache``); None if it is not enabled and the task (one of
  ``STORE_TASKS``) does not need it.

  Fields of ``config.store`` (defaults in ``configs/default.py``):
  ``tiers`` (a comma list of device, host, disk; used fastest first),
  ``chunk_size`` (tokens), ``device_mib`` / ``host_mib`` / ``disk_mib``
  (capacities), ``dir`` (the disk tier's directory), ``replacement`` (a rule
  of ``policies/replacement``: lru, lfu, fifo; each tier gets its own), and
  ``key_file`` or ``key_env`` (an AES-256 key: seals host and disk chunks).
  """
  store_config = config.get("store")
  if store_config is None or not (store_config.get("enabled", False)
                                  or config.get("task") in STORE_TASKS):
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
    raise InputError(
        f"model {lm.cfg.name} has no tokenizer to read calibration text "
        f"(key centering and the measuring policies need it); pass "
        f"calibration_tokens, or use --config.quant.center_keys=False with "
        f"--calibration=uniform")
  get = quant_config.get
  text = shakespeare.load_text(get("calibration_text")
                               or defaults.CALIBRATION_TEXT)
  return lm.tokenizer.encode(text)[:int(get("calibration_tokens")
                                        or defaults.CALIBRATION_TOKENS)]


def quant_plan(quant_config, lm, calibration_tokens=None) -> QuantPlan | None:
  """The quant plan a run asks for, or None for a full-precision cache.

  Fields of ``quant_config`` (a ConfigDict or dict): ``plan`` (path of a
  saved plan; wins over the rest), ``kv_bits`` (16 = off, else the average
  code bits), ``calibration`` (a policy name or call string, e.g.
  ``kvquant(sink_tokens=4)``), ``group_size``, ``residual``, ``sinks``,
  ``copy_bits`` (8 holds the sink and recent copies as int8 codes, 16 in
  the cache's dtype), ``rotate`` (Hadamard-rotate head vectors),
  ``center_keys`` (subtract each key channel's mean on the calibration
  text), ``save_plan`` (directory to save the chosen plan
  into) and ``overwrite_plan`` (False: a plan already there is an error).
  A field left out takes its value from ``lmcache_jax.defaults``, as the
  command line and the Python API do.
  ``calibration_tokens`` is real text (token ids) for centering and for
  policies that measure; None reads ``calibration_text`` (see
  ``calibration_text_tokens``).
  """
  get = quant_config.get
  if get("plan", ""):
    plan = QuantPlan.load(get("plan"), lm.cfg)
    show_plan(plan, f"loaded quant plan {get('plan')}: ")
    return plan
  bits = float(get("kv_bits", 16))
  if bits >= 16:
    return None
  policy = CALIBRATION.make(get("calibration", "uniform") or "uniform")
  center = bool(get("center_keys", defaults.CENTER_KEYS))
  # what the model produced on calibration text: read once, for centering
  # and for the policies that measure
  acts = None
  if center or policy.name != "uniform":
    if calibration_tokens is None:
      calibration_tokens = calibration_text_tokens(quant_config, lm)
    acts = calibration.collect(lm, calibration_tokens)
  storage = calibration.Storage(
      rotate=bool(get("rotate", defaults.ROTATE)),
      key_shift=calibration.key_means(acts) if center else None)
  plan = policy.calibrate(lm, acts, bits=bits,
                          group_size=int(get("group_size", defaults.GROUP_SIZE)),
                          residual=int(get("residual", defaults.RESIDUAL)),
                          sinks=int(get("sinks", defaults.SINKS)),
                          storage=storage)
  # a policy with its own copy_bits (kivi: a full-precision residual) keeps it
  plan = plan.replace(copy_bits=int(getattr(policy, "copy_bits", None)
                                    or get("copy_bits", defaults.COPY_BITS)))
  show_plan(plan)
  if get("save_plan", ""):
    path = plan.save(get("save_plan"), overwrite=bool(get("overwrite_plan")))
    print(f"saved quant plan to {path}")
  return plan


def verbose() -> bool:
  """Whether the run asked for detail: DEBUG logging (``experiments.run
  -v=1``; absl's default verbosity 0 is INFO)."""
  return std_logging.getLogger(__name__).isEnabledFor(std_logging.DEBUG)


def show_plan(plan: QuantPlan, prefix: str = "") -> None:
  """Prints the plan's one-line summary (formats counted, average bits,
  knobs); its per-layer, per-head formats too when ``verbose``."""
  summary, _, detail = plan.describe().partition("\n")
  print(prefix + summary)
  if verbose() and detail:
    print(detail)
