"""Calibrate a quant plan on real text, print it and save it.

  python -m experiments.run --task=calibrate --kv_bits=3 --calibration=sensitivity
  python -m experiments.run --quant_plan=runs/plan-sensitivity-3bits-<time>

The plan is saved with orbax-checkpoint under ``output_dir``; the run
harness has already built it (``experiments.setup.quant_plan`` prints what it chose).
"""

from __future__ import annotations

import pathlib
import time

from experiments.context import RunContext
from experiments.tasks import TASKS
from lmcache_jax import quant


@TASKS.register("calibrate")
def calibrate(ctx: RunContext) -> dict:
  """Runs the configured calibration policy and saves its plan."""
  config = ctx.config
  if config.quant.kv_bits >= 16 and not config.quant.plan:
    raise ValueError("--task=calibrate needs --kv_bits below 16 (the average "
                     "bits to allocate)")
  start = time.perf_counter()
  plan = ctx.quant or quant.from_config(config.quant, ctx.lm)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path = plan.save(pathlib.Path(config.output_dir) /
                   f"plan-{plan.policy}-{plan.average_bits():g}bits-{stamp}")
  print(f"saved quant plan: {path}\n  reuse with --quant_plan={path}")
  return {"plan_path": str(path), "policy": plan.policy,
          "average_bits": plan.average_bits(), "formats": plan.formats,
          "group_size": plan.group_size, "residual": plan.residual,
          "sinks": plan.sinks, "seconds": time.perf_counter() - start}
