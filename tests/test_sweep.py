"""Sweeps: the grid, resume after a crash, the table and plots, clear failures."""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ByteTokenizer, tiny_config, tiny_weights
from configs import default
from experiments import results, setup, sweep
from experiments import run as run_lib
from lmcache_jax.models import LoadedModel
from lmcache_jax.models.llama import from_weights

_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in "
         "the mind to suffer the slings and arrows of outrageous fortune. ") * 3


REPO = pathlib.Path(__file__).parent.parent
# Every sweep config shipped, as found on disk: a new one is tested too.
SHIPPED_SWEEPS = sorted(p.stem for p in (REPO / "configs" / "sweeps").glob("*.py")
                        if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def byte_lm():
  # head_dim 32: the smallest that every packed format (int2 included) holds
  cfg = tiny_config(vocab_size=256, max_context=512, head_dim=32)
  model = from_weights(cfg, tiny_weights(cfg), jnp.float32)
  return LoadedModel.from_module(model, ByteTokenizer(), "tiny-bytes")


def sweep_config(tmp_path, **axes) -> ml_collections.ConfigDict:
  text_file = tmp_path / "text.txt"
  text_file.write_text(_TEXT)
  config = default.get_config("runlocal")
  config.model = "tiny-bytes"
  config.dtype = "float32"
  config.context = 64
  config.text_file = str(text_file)
  config.output_dir = str(tmp_path / "sweep")
  config.perplexity.chunk = 16
  config.perplexity.buckets = 4
  config.sweep = ml_collections.ConfigDict(dict(
      name="test", tasks=("perplexity",), policies=("full", "sliding_window"),
      budgets=(16.0, 32.0), kv_bits=(16.0,), calibrations=(), contexts=(),
      variants=(), keep_going=False))
  for key, value in axes.items():
    config.sweep[key] = value
  return config


def test_grid_collapses_budget_free_policies_and_full_precision(tmp_path):
  config = sweep_config(tmp_path, kv_bits=(16.0,),
                        calibrations=("uniform", "variance"))
  cells, invalid = sweep.grid(config)
  assert not invalid
  coords = sorted((c.policy.name, c.policy.budget) for c, _ in cells)
  # full takes no budget: one cell; 16 bits: calibration does not multiply.
  assert coords == [("full", 0.0), ("sliding_window", 16.0),
                    ("sliding_window", 32.0)]


def test_unknown_policy_and_task_fail_before_anything_runs(tmp_path):
  config = sweep_config(tmp_path, policies=("full", "no_such_policy"),
                        tasks=("perplexity", "no_such_task"))
  with pytest.raises(ValueError) as info:
    sweep.run_sweep(config, lm=None, progress=False)
  message = str(info.value)
  assert "no_such_policy" in message and "no_such_task" in message
  assert "valid:" in message and "keep_going" in message
  assert not (tmp_path / "sweep" / "cells").exists()


def test_sweep_writes_table_and_plots(tmp_path, byte_lm):
  config = sweep_config(tmp_path)
  report = sweep.run_sweep(config, byte_lm, progress=False)
  assert report.ran == 3 and report.skipped == 0 and not report.errors
  out = tmp_path / "sweep"
  csv_lines = (out / "results.csv").read_text().splitlines()
  assert csv_lines[0].startswith("task,policy,budget,kv_bits,calibration,context,ppl")
  assert len(csv_lines) == 1 + 3
  markdown = (out / "results.md").read_text()
  assert "| full |" in markdown and "| sliding_window | 16 |" in markdown
  for name in ("ppl_vs_kv_bytes.png", "ppl_by_position.png"):
    assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
  # No retrieval or reuse results: those plots are not drawn.
  assert not (out / "plots" / "accuracy_by_depth_length.png").exists()
  by_policy = {(r["policy"], r["budget"]): r for r in report.records}
  # The evicting cache is smaller than the full one, and is reported so.
  assert by_policy[("sliding_window", 16.0)]["kv_bytes"] < by_policy[("full", 0.0)]["kv_bytes"]
  # A cell's result equals a standalone run of the same config.
  cell = next(c for c, _ in sweep.grid(config)[0] if c.policy.name == "full")
  alone = run_lib.run(cell, byte_lm)
  assert alone["ppl"] == pytest.approx(by_policy[("full", 0.0)]["ppl"], rel=1e-6)


def test_restarted_sweep_runs_only_missing_cells(tmp_path, byte_lm, monkeypatch):
  config = sweep_config(tmp_path, budgets=(8.0, 16.0, 32.0))
  real_run = run_lib.run
  calls = []

  def crash_on_third(cell, lm):
    calls.append((cell.policy.name, cell.policy.budget))
    if len(calls) == 3:
      raise KeyboardInterrupt("killed mid-sweep")
    return real_run(cell, lm)

  monkeypatch.setattr(run_lib, "run", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(config, byte_lm, progress=False)
  done_first = calls[:2]
  cells_dir = tmp_path / "sweep" / "cells"
  assert len(list(cells_dir.glob("*.json"))) == 2
  assert not list(cells_dir.glob(".*.tmp"))

  # A cell file cut short by a crash is not trusted: it is run again.
  truncated, intact = sorted(cells_dir.glob("*.json"))
  kept = json.loads(intact.read_text())["cell"]["policy"]
  truncated.write_text(truncated.read_text()[:40])

  calls.clear()
  monkeypatch.setattr(run_lib, "run", lambda cell, lm: calls.append(
      (cell.policy.name, cell.policy.budget)) or real_run(cell, lm))
  report = sweep.run_sweep(config, byte_lm, progress=False)
  assert report.skipped == 1 and report.ran == 3 and len(calls) == 3
  assert (kept["name"], kept["budget"]) not in calls
  assert set(done_first) - {(kept["name"], kept["budget"])} <= set(calls)
  assert len(report.records) == 4

  calls.clear()
  again = sweep.run_sweep(config, byte_lm, progress=False)
  assert calls == [] and again.ran == 0 and again.skipped == 4


def test_keep_going_reports_failures_and_runs_the_rest(tmp_path, byte_lm,
                                                        monkeypatch):
  config = sweep_config(tmp_path, policies=("full", "no_such_policy"))
  config.sweep.keep_going = True
  real_run = run_lib.run

  def nan_for_full(cell, lm):
    if cell.policy.name == "full":
      raise FloatingPointError("non-finite log-likelihood")
    return real_run(cell, lm)

  monkeypatch.setattr(run_lib, "run", nan_for_full)
  report = sweep.run_sweep(config, byte_lm, progress=False)
  errors = " ".join(e["error"] for e in report.errors)
  assert "no_such_policy" in errors and "non-finite" in errors
  assert report.records == []
  assert "Cells that failed" in (tmp_path / "sweep" / "results.md").read_text()


def test_variants_and_overrides(tmp_path, byte_lm):
  config = sweep_config(tmp_path, policies=("full",),
                        variants=("perplexity.buckets=2", "perplexity.buckets=4"))
  report = sweep.run_sweep(config, byte_lm, progress=False)
  buckets = {r["variant"]: len(r["ppl_by_position"]) for r in report.records}
  assert buckets == {"perplexity.buckets=2": 2, "perplexity.buckets=4": 4}
  config.sweep.variants = ("perplexity.no_such_field=1",)
  with pytest.raises(ValueError, match="no field 'perplexity.no_such_field'"):
    sweep.run_sweep(config, byte_lm, progress=False)


def test_report_only_runs_nothing(tmp_path, byte_lm, monkeypatch):
  config = sweep_config(tmp_path, policies=("full",))
  sweep.run_sweep(config, byte_lm, progress=False)
  monkeypatch.setattr(run_lib, "run", lambda *a: pytest.fail("ran a cell"))
  config.sweep.policies = ("full", "sliding_window")
  report = sweep.run_sweep(config, byte_lm, progress=False, report_only=True)
  assert report.ran == 0 and len(report.records) == 1 and not report.stale
  # A sweep directory moved elsewhere keeps its finished cells.
  moved = tmp_path / "moved"
  shutil.copytree(tmp_path / "sweep" / "cells", moved / "cells")
  config.output_dir = str(moved)
  report = sweep.run_sweep(config, byte_lm, progress=False, report_only=True)
  assert len(report.records) == 1
  # Another task's settings do not change a perplexity cell...
  config.generate.max_new_tokens += 1
  report = sweep.run_sweep(config, byte_lm, progress=False, report_only=True)
  assert len(report.records) == 1
  # ...but its own do: the old cell is not reused, and is reported as stale.
  config.perplexity.buckets = 3
  report = sweep.run_sweep(config, byte_lm, progress=False, report_only=True)
  assert report.records == [] and len(report.stale) == 1


def shipped_sweep(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.sweeps.{name}").get_config(arg)


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweep_configs_load(name):
  module = importlib.import_module(f"configs.sweeps.{name}")
  for arg in (None, "runlocal"):
    config = module.get_config(arg)
    assert config.sweep.name == name and config.sweep.tasks
    assert f"configs/sweeps/{name}.py" in module.__doc__


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweep_builds_its_whole_grid(name, arg):
  """Every cell of every shipped sweep passes the checks a run makes before
  its model loads; each value of each axis has a cell."""
  config = shipped_sweep(name, arg)
  cells, invalid = sweep.grid(config)
  assert invalid == []
  axes = config.sweep
  assert {c.task for c, _ in cells} == set(axes.tasks)
  assert {c.policy.name for c, _ in cells} == set(axes.policies)
  assert {c.quant.kv_bits for c, _ in cells} == set(axes.kv_bits)
  assert {v for _, v in cells} == set(axes.variants or ("",))


def at_test_size(config, tmp_path, lm) -> ml_collections.ConfigDict:
  """``config``'s sweep shrunk to run in seconds on ``lm`` (the byte-level
  model): its lowest bits, its first policy that takes a budget (at 16
  tokens), its first variant, every task and calibration, on a short text."""
  text_file = tmp_path / "text.txt"
  text_file.write_text(_TEXT)
  config.update(dict(model="tiny-bytes", dtype="float32", context=64,
                     text_file=str(text_file),
                     output_dir=str(tmp_path / "sweep")))
  config.perplexity.update(dict(num_tokens=0, chunk=16))
  config.passkey.update(dict(lengths=(256,), depths=(0.5,), trials=1,
                             chunk=32, max_new_tokens=2))
  config.store.update(dict(dir=str(tmp_path / "store"), chunk_size=16))
  config.reuse.update(dict(doc_tokens=48, questions=config.reuse.questions[:1],
                           repeats=1, max_new_tokens=2))
  config.multiturn.update(dict(context_tokens=48, repeats=1, max_new_tokens=2,
                               messages=config.multiturn.messages[:2]))
  config.quant.update(dict(group_size=lm.cfg.head_dim, calibration_tokens=64))
  axes = config.sweep
  axes.policies = (next((p for p in axes.policies if setup.takes_budget(p)),
                        axes.policies[0]),)
  axes.budgets = (16.0,) if axes.budgets else ()
  axes.kv_bits = (min(axes.kv_bits),)
  axes.variants = tuple(axes.variants)[:1]
  return config


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweep_runs_its_lowest_bits_cells(name, tmp_path, byte_lm):
  """Each shipped sweep, shrunk, runs end to end: a quantized cell of each
  sweep that has one (the eviction sweep is full precision only)."""
  config = at_test_size(shipped_sweep(name), tmp_path, byte_lm)
  report = sweep.run_sweep(config, byte_lm, progress=False)
  calibrations = len(config.sweep.calibrations or ("",))
  assert report.errors == []
  assert report.ran == len(config.sweep.tasks) * (
      calibrations if config.sweep.kv_bits[0] < 16 else 1)
  bits = config.sweep.kv_bits[0]
  for cell_file in (tmp_path / "sweep" / "cells").glob("*.json"):
    cell_results = json.loads(cell_file.read_text())["results"]
    assert cell_results["kv_bits"] == pytest.approx(bits, abs=0.01)  # the plan's
    assert all(np.isfinite(cell_results[m]) for m in ("ppl", "accuracy", "speedup")
               if cell_results.get(m) is not None)


def test_cli_refuses_axis_flags_and_names_missing_cells(tmp_path):
  def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args], capture_output=True,
        text=True, timeout=120, cwd=str(REPO))
  refused = cli("--config=configs/sweeps/eviction.py", "--policy=h2o")
  assert refused.returncode != 0
  assert "--config.sweep.policies" in refused.stderr
  missing = cli("--config=configs/sweeps/eviction.py",
                "--config.sweep.tasks=('no_such_task',)",
                f"--output_dir={tmp_path}")
  assert missing.returncode != 0
  assert "unknown task name 'no_such_task'" in missing.stderr
