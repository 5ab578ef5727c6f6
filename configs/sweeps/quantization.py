"""KV quantization on the real SmolLM2-135M: perplexity (2K tokens of Hamlet)
and KV bytes at 16, 8, 4, 3 and 2 average bits for every calibration policy.

  python -m experiments.sweep --config=configs/sweeps/quantization.py
  python -m experiments.sweep --config=configs/sweeps/quantization.py:runlocal   # smoke run

Override anything, e.g. ``--config.sweep.kv_bits='(4.0,)'``. Results:
``runs/sweeps/quantization/``.
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.output_dir = "runs/sweeps/quantization"
  config.context = 2048
  config.sweep = ml_collections.ConfigDict()
  config.sweep.name = "quantization"
  config.sweep.tasks = ("perplexity",)
  config.sweep.policies = ("full",)
  config.sweep.budgets = ()
  config.sweep.kv_bits = (16.0, 8.0, 4.0, 3.0, 2.0)
  config.sweep.calibrations = ("uniform", "variance", "sensitivity", "kvquant")
  config.sweep.contexts = ()
  config.sweep.variants = ()
  config.sweep.keep_going = False
  if arg and "runlocal" in arg.split(","):
    config.context = 256
    config.sweep.kv_bits = (16.0, 4.0)
    config.sweep.calibrations = ("uniform",)
    config.output_dir = "runs/sweeps/quantization-runlocal"
  return config
