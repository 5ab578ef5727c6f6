"""Sweep cells on disk and the results table built from them.

Each finished cell is one JSON file under ``<sweep dir>/cells/``, written
atomically (temp file + rename), holding the cell's resolved config, its key
(a hash of that config) and the task's results. A cell file counts as done
only if it parses and its key and config match the cell asked for, so a
truncated or stale file is recomputed, never reported.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable

# Config fields that do not change a cell's result, left out of its key.
_NOT_IN_KEY = ("output_dir",)

# Columns that lead the table, in this order, when present.
IDENTITY = ("task", "policy", "budget", "kv_bits", "calibration", "context",
            "variant")
METRICS = ("ppl", "accuracy", "kv_bytes", "kv_mib", "ttft_cold_s",
           "ttft_warm_s", "tokens", "seconds")
_LAST = ("code_version",)


def _content(cell: dict) -> dict:
  """The cell's config as JSON would return it, without fields that do not
  change its result."""
  content = {k: v for k, v in cell.items() if k not in _NOT_IN_KEY}
  return json.loads(json.dumps(content, default=str))


def cell_key(cell: dict) -> str:
  """A short hash that names a cell's resolved config."""
  text = json.dumps(_content(cell), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def cell_filename(cell: dict) -> str:
  """Readable file name of a cell: its grid coordinates, then its key."""
  policy = cell["policy"]
  label = (f"{cell['task']}-{policy['name']}-b{policy['budget']:g}"
           f"-k{cell['quant']['kv_bits']:g}-{cell['quant']['calibration']}"
           f"-c{cell['context']}")
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label) + f"-{cell_key(cell)}.json"


def new_folder(parent: pathlib.Path, label: str) -> pathlib.Path:
  """A folder of ``parent`` that no one else has: ``label``, or ``label-2``,
  ``label-3``, ... if taken. Each try is one ``mkdir`` (atomic), so runs
  started in the same second never share a folder."""
  name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
  parent.mkdir(parents=True, exist_ok=True)
  for n in itertools.count(1):
    path = parent / (name if n == 1 else f"{name}-{n}")
    try:
      path.mkdir()
    except FileExistsError:
      continue
    return path


def save_cell(cells_dir: pathlib.Path, cell: dict, results: dict) -> pathlib.Path:
  """Writes one finished cell atomically: a crash leaves no partial file."""
  cells_dir.mkdir(parents=True, exist_ok=True)
  path = cells_dir / cell_filename(cell)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps({"key": cell_key(cell), "cell": cell,
                             "results": results}, indent=2, default=str) + "\n")
  os.replace(tmp, path)
  return path


def load_cell(cells_dir: pathlib.Path, cell: dict) -> dict | None:
  """The saved results of ``cell`` if present and intact, else None."""
  path = cells_dir / cell_filename(cell)
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if (not isinstance(saved, dict) or saved.get("key") != cell_key(cell)
      or not isinstance(saved.get("cell"), dict)
      or _content(saved["cell"]) != _content(cell)
      or not isinstance(saved.get("results"), dict)):
    return None
  return saved["results"]


def row(cell: dict, results: dict) -> dict:
  """One table row: the cell's grid coordinates and its scalar results (lists
  and dicts stay in the cell file)."""
  quantized = cell["quant"]["kv_bits"] < 16
  out = {"task": cell["task"], "policy": cell["policy"]["name"],
         "budget": cell["policy"]["budget"], "kv_bits": cell["quant"]["kv_bits"],
         "calibration": cell["quant"]["calibration"] if quantized else "",
         "context": cell["context"]}
  out.update({k: v for k, v in results.items() if k not in out and (
      isinstance(v, (str, int, float, bool)) or v is None)})
  if isinstance(out.get("kv_bytes"), (int, float)):
    out["kv_mib"] = out["kv_bytes"] / 2**20
  return out


def columns(rows: Iterable[dict]) -> list[str]:
  """Scalar columns: identity, then known metrics, then the rest sorted,
  version last."""
  present = {k for r in rows for k, v in r.items()
             if isinstance(v, (str, int, float, bool)) or v is None}
  lead = [c for c in (*IDENTITY, *METRICS) if c in present]
  last = [c for c in _LAST if c in present]
  rest = sorted(present - set(lead) - set(last))
  return lead + rest + last


def fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    if value == int(value) and abs(value) < 1e6:
      return str(int(value))
    return f"{value:.4g}"
  return str(value)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  cols = columns(rows)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, cols)
    writer.writeheader()
    for r in rows:
      writer.writerow({c: r.get(c, "") for c in cols})


# Bookkeeping that stays in the CSV and the cell files, out of the Markdown.
_CSV_ONLY = ("model", "load_seconds", "cache_bytes", "nll", "kv_bytes",
             "tokens_per_second", "code_version", "budget_tokens",
             "working_slots", "quant_plan", "text", "device", "device_count",
             "dtype")


def summary_columns(rows: list[dict]) -> list[str]:
  """The Markdown's columns: grid coordinates that vary, then the results."""
  cols = []
  for c in columns(rows):
    if c in IDENTITY:
      if len({str(r.get(c)) for r in rows}) > 1:
        cols.append(c)
    elif c not in _CSV_ONLY:
      cols.append(c)
  return cols


def markdown(rows: list[dict], cols: list[str] | None = None) -> str:
  """A GitHub Markdown table of ``rows`` (default: ``summary_columns``)."""
  cols = summary_columns(rows) if cols is None else cols
  lines = ["| " + " | ".join(cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def sort_rows(rows: list[dict]) -> list[dict]:
  """Rows by task, policy (``full`` first), budget, bits, calibration,
  context, variant."""
  def key(r):
    return (str(r.get("task")), r.get("policy") != "full", str(r.get("policy")),
            float(r.get("budget") or 0), -float(r.get("kv_bits") or 16),
            str(r.get("calibration", "")), int(r.get("context") or 0),
            str(r.get("variant", "")))
  return sorted(rows, key=key)
