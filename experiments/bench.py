"""Runs a benchmark suite and records its table.

  python -m experiments.bench --suite=model                       # configs/bench/model.py
  python -m experiments.bench --suite=model --config=configs/bench/model.py:runlocal
  python -m experiments.bench --suite=list

Suites are the modules of ``experiments/benchmarks/`` (see its docstring).
The table is printed last and saved, with the config, the device and the code
version, as ``<output_dir>/<time>-<suite>.{json,md}``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import benchmarks
from experiments.version import code_version

_SUITE = flags.DEFINE_string("suite", None, "Suite to run ('list' prints them).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Suite config; default configs/bench/<suite>.py.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/bench", "Where results go.")


def default_config(suite: str):
  """``configs/bench/<suite>.py``'s config, or None if the suite has none."""
  try:
    module = importlib.import_module(f"configs.bench.{suite}")
  except ModuleNotFoundError as e:
    if e.name not in (f"configs.bench.{suite}", "configs.bench", "configs"):
      raise
    return None
  return module.get_config()


def table(rows: list[dict]) -> str:
  from experiments.results import fmt
  cols = list(dict.fromkeys(k for r in rows for k in r))
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _SUITE.value:
    raise app.UsageError(f"--suite is required; one of: {', '.join(benchmarks.suites())}")
  if _SUITE.value == "list":
    print("\n".join(benchmarks.suites()))
    return
  try:
    suite = benchmarks.load_suite(_SUITE.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  config = _CONFIG.value if _CONFIG.value is not None else default_config(_SUITE.value)
  started = datetime.datetime.now(datetime.timezone.utc)
  out = suite.run(config)
  record = {"suite": _SUITE.value, "device": benchmarks.device_name(),
            "date": started.isoformat(timespec="seconds"),
            "code_version": code_version(), "argv": sys.argv,
            "config": config.to_dict() if config is not None else None, **out}
  out_dir = pathlib.Path(_OUTPUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"{started:%Y%m%d-%H%M%S}-{_SUITE.value}"
  (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
  text = (f"suite {_SUITE.value} on {record['device']}, {record['date']}, "
          f"code {record['code_version']}\n\n{table(out['rows'])}")
  (out_dir / f"{stem}.md").write_text(text)
  print(text)
  print(f"results: {out_dir / stem}.json")


if __name__ == "__main__":
  app.run(main)
