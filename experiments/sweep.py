"""Runs a grid of experiment cells with the model loaded once, resumably.

  python -m experiments.sweep --config=configs/sweeps/eviction.py
  python -m experiments.sweep --config=configs/sweeps/eviction.py:runlocal
  python -m experiments.sweep --config=configs/sweeps/eviction.py \\
      --config.sweep.budgets='(256,)' --config.output_dir=/tmp/ev
  python -m experiments.sweep --config=configs/sweeps/eviction.py --report_only

A sweep config is a run config (``configs/default.py``) plus a ``sweep``
section naming the axes: ``tasks``, ``policies``, ``budgets``, ``kv_bits``,
``calibrations``, ``contexts`` and ``variants`` (strings of
``field=value;field=value`` applied to the cell). The grid is their product,
with two collapses: a policy that takes no budget (``full``) runs once at
budget 0, and a full-precision cell (16 bits) ignores the calibration.

Each finished cell is saved atomically under ``<output_dir>/cells/``; a
restarted sweep runs only the cells missing there. At the end (and with
``--report_only``) it writes ``results.csv``, ``results.md`` and the standard
plots under ``<output_dir>/plots/``.

A cell whose policy, task or quantization does not exist fails the whole sweep
before the model loads, naming every such cell; with
``--config.sweep.keep_going=True`` the valid cells run and the invalid or
failing ones are listed in ``errors.json`` and the report (exit status 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import sys
import time
import traceback

import ml_collections
from absl import app, flags, logging
from tqdm.auto import tqdm

from experiments import plots, results, setup
from experiments import run as run_lib
from experiments.errors import InputError
from experiments.tasks import TASKS
from experiments.version import code_version
from lmcache_jax import models

# --config and the flat flags (--model, --context, --output_dir, ...) are those
# of experiments.run; the flat flags that name a sweep axis are refused.
_AXIS_FLAGS = {"task": "tasks", "policy": "policies", "budget": "budgets",
               "kv_bits": "kv_bits", "calibration": "calibrations"}
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Rebuild the table and plots from finished cells; run nothing.")


@dataclasses.dataclass
class SweepReport:
  """What a sweep produced: one record per finished cell, and the failures."""
  out_dir: pathlib.Path
  records: list[dict]
  errors: list[dict]
  ran: int
  skipped: int
  stale: list[str]   # cell files of another grid or config, ignored
  seconds: float
  files: list[pathlib.Path]


def _apply_variant(cell: ml_collections.ConfigDict, variant: str) -> None:
  """Sets ``field=value;field=value`` on ``cell``, typed like the field."""
  for assignment in filter(None, (a.strip() for a in variant.split(";"))):
    field, sep, text = assignment.partition("=")
    if not sep:
      raise InputError(f"sweep variant {variant!r}: {assignment!r} is not field=value")
    *parents, leaf = field.strip().split(".")
    node = cell
    for parent in parents:
      if parent not in node:
        raise InputError(f"sweep variant {variant!r}: config has no field {field!r}")
      node = node[parent]
    if leaf not in node:
      raise InputError(f"sweep variant {variant!r}: config has no field {field!r}")
    old = node[leaf]
    if isinstance(old, bool):
      value = text.strip().lower() in ("1", "true", "yes")
    else:
      value = type(old)(text.strip()) if old is not None else text.strip()
    node[leaf] = value


Cell = tuple[ml_collections.ConfigDict, str]  # (resolved run config, variant)


def grid(config: ml_collections.ConfigDict) -> tuple[list[Cell], list[dict]]:
  """The sweep's cells, and the cells that cannot run.

  A cannot-run entry is ``{"cell": label, "error": message}``: whatever a
  run refuses before its model loads (``setup.check``), such as an unknown
  task or policy, a budget the prompt cannot hold, or bits no calibration
  provides.
  """
  sweep = config.sweep
  base = ml_collections.ConfigDict(config.to_dict())
  del base["sweep"]
  contexts = tuple(sweep.contexts) or (config.context,)
  calibrations = tuple(sweep.calibrations) or (config.quant.calibration,)
  variants = tuple(sweep.get("variants", ())) or ("",)
  cells, invalid, seen = [], [], set()
  for task, policy, budget, bits, calibration, context, variant in itertools.product(
      sweep.tasks, sweep.policies, sweep.budgets or (0,), sweep.kv_bits,
      calibrations, contexts, variants):
    name = f"{task} / {policy} / budget {budget:g} / {bits:g}-bit {calibration} / ctx {context}"
    name += f" / {variant}" if variant else ""
    try:
      budget = budget if setup.takes_budget(policy) else 0.0
      TASKS.get(task)
      calibration = calibration if bits < 16 else config.quant.calibration
      cell = ml_collections.ConfigDict(base.to_dict())
      cell.task, cell.context = task, int(context)
      cell.policy.name, cell.policy.budget = policy, float(budget)
      cell.quant.kv_bits, cell.quant.calibration = float(bits), calibration
      _apply_variant(cell, variant)
      setup.check(cell, TASKS.names(), model=False)
    except (ValueError, FileNotFoundError) as e:
      if name not in {i["cell"] for i in invalid}:
        invalid.append({"cell": name, "error": str(e)})
      continue
    key = results.cell_key(identity(cell))
    if key not in seen:
      seen.add(key)
      cells.append((cell, variant))
  return cells, invalid


def identity(cell: ml_collections.ConfigDict) -> dict:
  """What names a cell's result: its config without the sections of other
  tasks (``passkey`` settings do not change a perplexity cell), so adding a
  task's defaults does not orphan finished cells."""
  others = set(TASKS.names()) - {cell.task}
  return {k: v for k, v in cell.to_dict().items() if k not in others}


def _record(cell: dict, cell_results: dict, variant: str) -> dict:
  record = {**cell_results, **results.row(cell, cell_results)}
  if variant:
    record["variant"] = variant
  return record


def run_sweep(config: ml_collections.ConfigDict, lm: models.LoadedModel | None = None,
              *, progress: bool = True, report_only: bool = False) -> SweepReport:
  """Runs the missing cells of ``config``'s grid, then writes table and plots.

  Args:
    lm: a loaded model to use for every cell; by default the config's model is
      loaded once, and only if some cell has to run.
    report_only: run nothing; report the cells already finished.
  """
  start = time.perf_counter()
  out_dir = pathlib.Path(config.output_dir)
  cells_dir = out_dir / "cells"
  cells, errors = grid(config)
  if errors and not config.sweep.keep_going:
    listing = "\n".join(f"  {e['cell']}: {e['error']}" for e in errors)
    raise InputError(f"{len(errors)} sweep cell(s) cannot run:\n{listing}\n"
                     f"(set --config.sweep.keep_going=True to run the others)")
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "sweep.json").write_text(json.dumps(
      {"config": config.to_dict(), "code_version": code_version(),
       "argv": sys.argv}, indent=2, default=str) + "\n")

  records, todo = [], []
  for cell, variant in cells:
    saved = results.load_cell(cells_dir, identity(cell))
    if saved is not None:
      records.append(_record(identity(cell), saved, variant))
    else:
      todo.append((cell, variant))
  skipped = len(records)
  wanted = {results.cell_filename(identity(c)) for c, _ in cells}
  stale = sorted(p.name for p in cells_dir.glob("*.json") if p.name not in wanted)
  if stale:
    logging.warning("%d cell file(s) in %s belong to no cell of this sweep (its "
                    "grid or config changed since they ran); ignored", len(stale),
                    cells_dir)
  ran = 0
  if todo and not report_only:
    if lm is None:
      lm = setup.load_model(todo[0][0])
    bar = tqdm(todo, desc=config.sweep.name, unit="cell", disable=not progress)
    for cell, variant in bar:
      bar.set_postfix_str(f"{cell.task} {cell.policy.name} b={cell.policy.budget:g} "
                          f"k={cell.quant.kv_bits:g}")
      try:
        cell_results = run_lib.run(cell, lm)
      except Exception as e:  # noqa: BLE001 - reported per cell when keep_going
        if not config.sweep.keep_going:
          raise
        logging.warning("cell failed: %s", traceback.format_exc())
        errors.append({"cell": results.cell_filename(identity(cell)),
                       "error": f"{type(e).__name__}: {e}"})
        continue
      results.save_cell(cells_dir, identity(cell), cell_results)
      records.append(_record(identity(cell), cell_results, variant))
      ran += 1
  rows = results.sort_rows(records)
  files = write_report(config, out_dir, rows, errors)
  return SweepReport(out_dir, rows, errors, ran, skipped, stale,
                     time.perf_counter() - start, files)


def write_report(config, out_dir: pathlib.Path, rows: list[dict],
                 errors: list[dict]) -> list[pathlib.Path]:
  """results.csv, results.md (a table per task, plots, errors) and plots/."""
  files = []
  if rows:
    results.write_csv(rows, out_dir / "results.csv")
    files.append(out_dir / "results.csv")
  pngs = plots.standard_plots(rows, out_dir / "plots") if rows else []
  files += pngs
  lines = [f"# Sweep `{config.sweep.name}`", "",
           f"Model `{config.model}`, dtype {config.dtype}, code "
           f"`{code_version()}`; {len(rows)} cell(s) finished.", ""]
  for task in sorted({r["task"] for r in rows}):
    task_rows = [r for r in rows if r["task"] == task]
    fixed = [f"{c} {results.fmt(task_rows[0].get(c))}" for c in results.IDENTITY
             if c != "task" and c not in results.summary_columns(task_rows)
             and task_rows[0].get(c) not in (None, "")]
    lines += [f"## {task}", "", f"In every row: {', '.join(fixed)}.", "",
              results.markdown(task_rows)]
  lines += [f"![{p.stem}](plots/{p.name})" for p in pngs]
  if errors:
    (out_dir / "errors.json").write_text(json.dumps(errors, indent=2) + "\n")
    lines += ["", "## Cells that failed", ""]
    lines += [f"- {e['cell']}: {e['error']}" for e in errors]
  (out_dir / "results.md").write_text("\n".join(lines) + "\n")
  files.append(out_dir / "results.md")
  return files


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag, axis in _AXIS_FLAGS.items():
    if flags.FLAGS[flag].present:
      raise app.UsageError(f"--{flag} is an axis of the sweep; set "
                           f"--config.sweep.{axis}='(...)' instead")
  config = run_lib.resolved_config()
  if "sweep" not in config:
    raise app.UsageError(f"--config={flags.FLAGS['config'].config_filename} has "
                         f"no `sweep` section; give a sweep config "
                         f"(configs/sweeps/NAME.py)")
  try:
    report = run_sweep(config, report_only=_REPORT_ONLY.value)
  except (InputError, FileNotFoundError) as e:
    logging.debug("sweep failed", exc_info=True)
    sys.exit(f"error: {e}")
  print(f"{report.ran} cell(s) run, {report.skipped} already done, "
        f"{len(report.errors)} failed, {report.seconds:.0f} s")
  if report.stale:
    print(f"{len(report.stale)} cell file(s) of another grid or config ignored")
  for path in report.files:
    print(path)
  if report.errors:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
