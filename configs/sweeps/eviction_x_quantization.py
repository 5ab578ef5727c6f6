"""Eviction and quantization together on the real SmolLM2-135M: is a pruned
4-bit cache better than a full 2-bit one of the same bytes? Perplexity and
passkey accuracy against KV bytes, one Pareto plot across both.

  python -m experiments.sweep --config=configs/sweeps/eviction_x_quantization.py
  python -m experiments.sweep --config=configs/sweeps/eviction_x_quantization.py:runlocal

Results: ``runs/sweeps/eviction_x_quantization/``.
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.output_dir = "runs/sweeps/eviction_x_quantization"
  config.context = 2048
  config.sweep = ml_collections.ConfigDict()
  config.sweep.name = "eviction_x_quantization"
  config.sweep.tasks = ("perplexity", "passkey")
  config.sweep.policies = ("full", "attention_sink", "h2o", "snapkv")
  config.sweep.budgets = (256.0, 512.0)
  config.sweep.kv_bits = (16.0, 8.0, 4.0, 2.0)
  # attention_sink re-rotates its sink keys, which a quantized cache must
  # therefore hold exactly, in the cache dtype (int8 copies would be rounded
  # again at every rotation).
  config.quant.sinks = 4
  config.quant.copy_bits = 16
  config.sweep.calibrations = ("uniform",)
  config.sweep.contexts = ()
  config.sweep.variants = ()
  config.sweep.keep_going = False
  if arg and "runlocal" in arg.split(","):
    config.context = 256
    config.sweep.policies = ("full", "attention_sink")
    config.sweep.budgets = (64.0,)
    config.sweep.kv_bits = (16.0, 4.0)
    config.output_dir = "runs/sweeps/eviction_x_quantization-runlocal"
  return config
