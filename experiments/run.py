"""Runs one experiment task on a model with a cache policy, writing JSON results.

  python -m experiments.run                                   # perplexity, Hamlet
  python -m experiments.run --task=generate --prompt="Name three planets."
  python -m experiments.run --policy=attention_sink --budget=256 --context=4096
  python -m experiments.run --policy=list                     # what exists
  python -m experiments.run --config=configs/default.py --config.perplexity.chunk=128

Flat flags are shortcuts for config fields; anything else is
``--config.<field>=value``. Results and the resolved config land in
``<output_dir>/<time>-<task>-<model>-<policy>/``.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import setup
from experiments.version import code_version
from experiments.context import RunContext
from experiments.tasks import TASKS
from experiments.texts import load_eval_text
from lmcache_jax import models
from lmcache_jax.fetch import FetchError
from policies.registry import EVICTION

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent.parent / "configs" / "default.py"),
    "Experiment config file (ml_collections).", lock_config=True)

# Flat flag -> config field. None defaults mean "keep the config's value".
_FLAT = {
    "task": ("task", str, "Task to run; 'list' prints the tasks."),
    "model": ("model", str, "Preset name, .gguf file or safetensors dir; 'list' prints presets."),
    "policy": ("policy.name", str, "Eviction policy (or 'name(k=v)'); 'list' prints them."),
    "budget": ("policy.budget", float, "Cache budget: tokens, or a fraction of the context."),
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
    return EVICTION.describe()
  if config.model == "list":
    return "\n".join(models.known_models())
  return None


def build_context(config, lm: models.LoadedModel | None = None) -> RunContext:
  """The run's policy, model, quantization and store; ``lm`` reuses a loaded
  model (sweeps load it once for all cells)."""
  policy = setup.make_policy(config.policy, config.context)
  if config.text_file:
    load_eval_text(config.text, config.text_file)  # fail before the model loads
  lm = setup.load_model(config) if lm is None else lm
  quant = setup.make_quant(config, lm)
  store = setup.make_store(config, lm)
  return RunContext(config=config, lm=lm, policy=policy.bind(lm.cfg),
                    quant=quant, store=store)


def write_results(config, results: dict) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  label = "-".join([stamp, config.task, config.model, config.policy.name])
  run_dir = pathlib.Path(config.output_dir) / re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (run_dir / "config.json").write_text(json.dumps(
      {"config": config.to_dict(), "code_version": results["code_version"],
       "argv": sys.argv}, indent=2) + "\n")
  return run_dir


def run(config, lm: models.LoadedModel | None = None) -> dict:
  """Runs the configured task; returns its results with the run's identity."""
  task = TASKS.get(config.task)
  start = time.perf_counter()
  ctx = build_context(config, lm)
  load_seconds = time.perf_counter() - start
  results = {
      "task": config.task,
      "model": config.model,
      "policy": config.policy.name,
      "budget": config.policy.budget,
      "kv_bits": config.quant.kv_bits,
      "context": config.context,
      "load_seconds": load_seconds,
      **task(ctx),
      "code_version": code_version(),
  }
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = resolved_config()
  try:
    text = listing(config)
    if text is not None:
      print(text)
      return
    results = run(config)
  except (ValueError, FileNotFoundError, FetchError, FloatingPointError) as e:
    logging.debug("run failed", exc_info=True)
    sys.exit(f"error: {e}")
  run_dir = write_results(config, results)
  summary = {k: v for k, v in results.items()
             if not isinstance(v, (list, dict)) and k not in ("text", "prompt")}
  print(json.dumps(summary, indent=2))
  print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
