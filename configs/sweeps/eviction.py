"""Eviction policies x budgets on the real SmolLM2-135M: streaming perplexity
on Hamlet and passkey retrieval, every policy at 128, 256 and 512 tokens
beside ``full``.

  python -m experiments.sweep --config=configs/sweeps/eviction.py
  python -m experiments.sweep --config=configs/sweeps/eviction.py:runlocal   # smoke run

Measured on the 2-core CPU (float32): 56 cells in 50.5 min of wall time
while other jobs kept the load average near 9 (25.5 min of user CPU time);
resume with the same command after an interruption.

Override anything, e.g. ``--config.sweep.budgets='(256,)'`` or
``--config.sweep.tasks='("perplexity",)'``. Results: ``runs/sweeps/eviction/``
(results.md, results.csv, plots/).
"""

from __future__ import annotations

import ml_collections

from configs import default

POLICIES = ("full", "sliding_window", "attention_sink", "h2o", "tova", "snapkv",
            "pyramidkv", "adakv", "knorm", "random")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.output_dir = "runs/sweeps/eviction"
  config.context = 2048
  # Chunks of 64: the cache holds budget + 64 slots while a chunk streams in,
  # so the reported KV bytes stay close to the budget.
  config.perplexity.chunk = 64
  config.sweep = ml_collections.ConfigDict()
  config.sweep.name = "eviction"
  config.sweep.tasks = ("perplexity", "passkey")
  config.sweep.policies = POLICIES
  config.sweep.budgets = (128.0, 256.0, 512.0)
  config.sweep.kv_bits = (16.0,)
  config.sweep.calibrations = ()
  config.sweep.contexts = ()
  config.sweep.variants = ()
  config.sweep.keep_going = False
  if arg and "runlocal" in arg.split(","):
    config.context = 256
    config.sweep.budgets = (64.0, 128.0)
    config.perplexity.chunk = 32
    config.output_dir = "runs/sweeps/eviction-runlocal"
  return config
