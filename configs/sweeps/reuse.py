"""Prefix reuse on the real SmolLM2-135M: time to first token cold (recompute)
vs warm (prefix loaded from the store), per tier, full precision and 4-bit,
for long-document QA and multi-turn chat.

  python -m experiments.sweep --config=configs/sweeps/reuse.py
  python -m experiments.sweep --config=configs/sweeps/reuse.py:runlocal

Each variant picks the tier the warm prefix comes from. Results:
``runs/sweeps/reuse/`` (plots/ttft_cold_warm.png).
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.output_dir = "runs/sweeps/reuse"
  config.context = 2048
  config.store.enabled = True
  config.store.dir = "runs/sweeps/reuse/store"
  config.sweep = ml_collections.ConfigDict()
  config.sweep.name = "reuse"
  config.sweep.tasks = ("reuse", "multiturn")
  config.sweep.policies = ("full",)
  config.sweep.budgets = ()
  config.sweep.kv_bits = (16.0, 4.0)
  config.sweep.calibrations = ("uniform",)
  config.sweep.contexts = ()
  config.sweep.variants = ("store.tiers=device", "store.tiers=host",
                           "store.tiers=disk")
  config.sweep.keep_going = False
  if arg and "runlocal" in arg.split(","):
    config.context = 512
    config.sweep.kv_bits = (16.0,)
    config.sweep.variants = ("store.tiers=host",)
    config.output_dir = "runs/sweeps/reuse-runlocal"
  return config
