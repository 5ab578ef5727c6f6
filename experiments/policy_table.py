"""The table of docs/policies.md: the eviction sweep, one row per policy.

  python -m experiments.policy_table --config=configs/sweeps/eviction.py
  python -m experiments.policy_table --config=configs/sweeps/eviction.py --report_only

Runs the sweep's missing cells (resumable, see ``experiments.sweep``), then
pivots its records: streaming perplexity and passkey accuracy (with the hit
per depth) at each budget, ``full`` beside every budget. Writes
``<output_dir>/policy_table.md`` and prints it.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments import run as run_lib
from experiments import sweep as sweep_lib
from experiments.results import fmt


def _cell(rows: list[dict], task: str, policy: str, budget: float) -> dict | None:
  for row in rows:
    if row["task"] == task and row["policy"] == policy and (
        policy == "full" or row["budget"] == budget):
      return row
  return None


def _passkey(row: dict | None) -> str:
  if row is None:
    return ""
  depths = sorted(k for k in row if k.startswith("acc_depth_"))
  hits = "".join("✓" if row[k] == 1.0 else ("✗" if row[k] == 0.0 else "~")
                 for k in depths)
  return f"{fmt(row['accuracy'])} {hits}"


def pivot(rows: list[dict], policies: tuple[str, ...],
          budgets: tuple[float, ...]) -> str:
  """Markdown: a row per policy, perplexity then passkey columns per budget."""
  head = (["policy"] + [f"ppl @{b:g}" for b in budgets]
          + [f"passkey @{b:g}" for b in budgets]
          + [f"KV MiB @{b:g}" for b in budgets])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for policy in policies:
    ppl = [_cell(rows, "perplexity", policy, b) for b in budgets]
    key = [_cell(rows, "passkey", policy, b) for b in budgets]
    cells = ([fmt(r["ppl"]) if r else "" for r in ppl]
             + [_passkey(r) for r in key]
             + [fmt(r["kv_bytes"] / 2**20) if r else "" for r in ppl])
    lines.append("| " + " | ".join([policy] + cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = run_lib.resolved_config()
  if "sweep" not in config:
    raise app.UsageError("give the eviction sweep: "
                         "--config=configs/sweeps/eviction.py")
  report = sweep_lib.run_sweep(config,
                               report_only=flags.FLAGS["report_only"].value)
  table = pivot(report.records, tuple(config.sweep.policies),
                tuple(config.sweep.budgets))
  path = pathlib.Path(config.output_dir) / "policy_table.md"
  path.write_text(table + "\n")
  print(table)
  print(f"\n{len(report.records)} cells; {path}")


if __name__ == "__main__":
  app.run(main)
