"""Calibrate a quant plan on real text, print it and save it.

  python -m experiments.run --task=calibrate --kv_bits=3 --calibration=sensitivity
  python -m experiments.run --quant_plan=runs/plan-sensitivity-3bits-<time>

The plan is saved (``QuantPlan.save``) under ``output_dir``; the run
harness has already built it (``experiments.setup.quant_plan`` prints what it chose).
"""

from __future__ import annotations

import pathlib
import time

from experiments import results
from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS
from lmcache_jax.engine import calibration


@TASKS.register("calibrate")
def calibrate(ctx: RunContext) -> dict:
  """Runs the configured calibration policy and saves its plan."""
  config = ctx.config
  if config.quant.kv_bits >= 16 and not config.quant.plan:
    raise InputError("--task=calibrate needs --kv_bits below 16 (the average "
                     "bits to allocate)")
  start = time.perf_counter()
  plan = ctx.quant   # built by the harness (experiments.setup.make_quant)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path = plan.save(results.new_folder(
      pathlib.Path(config.output_dir),
      f"plan-{plan.policy}-{plan.average_bits():g}bits-{stamp}"))
  # what a bf16-storage cache of `context` slots allocates for it (the bytes
  # the allocator's budget is charged on)
  nbytes = calibration.cache_bytes(ctx.lm.cfg, plan, config.context)(
      plan.formats)
  rows = calibration.rows_of(plan.formats)
  print(f"payload rows per format {dict(sorted(rows.items()))}; "
        f"{nbytes:,} bytes for {config.context} tokens (bf16 storage)")
  print(f"saved quant plan: {path}\n  reuse with --quant_plan={path}")
  return {"plan_path": str(path), "policy": plan.policy,
          "average_bits": plan.average_bits(), "formats": plan.formats,
          "rows": rows, "kv_bytes": nbytes,
          "group_size": plan.group_size, "residual": plan.residual,
          "sinks": plan.sinks, "seconds": time.perf_counter() - start}
