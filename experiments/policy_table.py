"""The table of docs/policies.md: the eviction sweep, one row per policy.

  python -m experiments.policy_table --config=configs/sweeps/eviction.py
  python -m experiments.policy_table --config=configs/sweeps/eviction.py --report_only

Runs the sweep's missing cells (resumable, see ``experiments.sweep``), then
pivots its records: perplexity, or retrieval accuracy with the hit per depth,
for each task and budget, ``full`` beside every budget. Writes
``<output_dir>/policy_table.md`` and prints it.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments import run as run_lib
from experiments import sweep as sweep_lib


def _cell(rows: list[dict], task: str, policy: str, budget: float) -> dict | None:
  for row in rows:
    if row["task"] == task and row["policy"] == policy and (
        policy == "full" or row["budget"] == budget):
      return row
  return None


def _accuracy(row: dict | None) -> str:
  """Accuracy, then one mark per depth: hit in every trial, none, or some."""
  if row is None:
    return ""
  depths = sorted(k for k in row if k.startswith("acc_depth_"))
  hits = "".join("✓" if row[k] == 1.0 else ("✗" if row[k] == 0.0 else "~")
                 for k in depths)
  return f"{row['accuracy']:.2f} {hits}"


def pivot(rows: list[dict], tasks: tuple[str, ...], policies: tuple[str, ...],
          budgets: tuple[float, ...]) -> str:
  """Markdown: a row per policy; per task and budget, perplexity or accuracy;
  then the KV bytes the cache allocated."""
  head, getters = ["policy"], []
  for task in tasks:
    for b in budgets:
      head.append(f"{task} @{b:g}")
      getters.append((task, b, (lambda r: f"{r['ppl']:.2f}")
                      if task == "perplexity" else _accuracy))
  for b in budgets:
    head.append(f"KV MiB @{b:g}")
    getters.append((tasks[0], b, lambda r: f"{r['kv_bytes'] / 2**20:.1f}"))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for policy in policies:
    cells = []
    for task, budget, show in getters:
      row = _cell(rows, task, policy, budget)
      cells.append(show(row) if row else "")
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
  table = pivot(report.records, tuple(config.sweep.tasks),
                tuple(config.sweep.policies), tuple(config.sweep.budgets))
  path = pathlib.Path(config.output_dir) / "policy_table.md"
  path.write_text(table + "\n")
  print(table)
  print(f"\n{len(report.records)} cells; {path}")


if __name__ == "__main__":
  app.run(main)
