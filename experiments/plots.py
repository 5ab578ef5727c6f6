"""The standard plots of a sweep, drawn from its result records.

A record is one cell's results with its grid coordinates (``task``,
``policy``, ``budget``, ``kv_bits``, ``calibration``, ``context``). Plots read
these result keys, and skip themselves when no record has them:

- ``kv_bytes`` with ``ppl`` or ``accuracy``: quality vs cache memory, with the
  Pareto front across policies (with ``live_slots_max`` and
  ``cache_capacity``, the bytes of the slots kept, e.g. after compressing a
  prompt, rather than of the slots allocated);
- ``ppl_by_position``: ``[{"start", "end", "ppl"}]``, perplexity along the
  stream (StreamingLLM's figure);
- ``samples`` (or ``by_depth``): ``[{"depth", "correct" or "accuracy",
  optional "length" or "context"}]``, retrieval accuracy by needle depth and
  context length (a heat map; the cell's ``context`` is the length when a
  record gives none);
- ``ttft_cold_s`` and ``ttft_warm_s`` (or ``*_ms``): time to first token
  recomputing vs loading a cached prefix.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas, no
pyplot state), so they work headless, in tests and in notebooks alike.
"""

from __future__ import annotations

import collections
import math
import pathlib
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator

_MARKERS = "osD^v<>ph*"


def label(record: dict, budget: bool = True) -> str:
  """``h2o@256 4-bit uniform [store.tiers=host]`` style name of a cell."""
  name = record["policy"]
  if budget and record.get("budget"):
    name += f"@{record['budget']:g}"
  if record.get("kv_bits", 16) < 16:
    name += f" {record['kv_bits']:g}-bit {record.get('calibration', '')}".rstrip()
  if record.get("variant"):
    name += f" [{record['variant']}]"
  return name


def _colors(names: list[str]) -> dict[str, tuple]:
  from matplotlib import colormaps
  cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
  return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool
                 ) -> list[tuple[float, float]]:
  """Points no other point beats on both memory (lower) and quality."""
  best = -math.inf if higher_is_better else math.inf
  front = []
  for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
    if (y > best) if higher_is_better else (y < best):
      front.append((x, y))
      best = y
  return front


def _compressed(record: dict) -> bool:
  return bool(record.get("live_slots_max") and record.get("cache_capacity"))


def _kept_mib(record: dict) -> float:
  """KV payload in MiB: of the live slots when the record says how many."""
  mib = record["kv_bytes"] / 2**20
  if _compressed(record):
    mib *= record["live_slots_max"] / record["cache_capacity"]
  return mib


def quality_vs_memory(records: list[dict], metric: str) -> Figure | None:
  """``metric`` (ppl or accuracy) vs KV bytes, a series per policy, with the
  Pareto front across all of them."""
  points = [r for r in records if isinstance(r.get(metric), (int, float))
            and isinstance(r.get("kv_bytes"), (int, float))]
  if not points:
    return None
  higher = metric != "ppl"
  policies = sorted({r["policy"] for r in points}, key=lambda p: (p != "full", p))
  bits = sorted({r.get("kv_bits", 16) for r in points}, reverse=True)
  colors = _colors(policies)
  tasks = sorted({r["task"] for r in points})
  fig = Figure(figsize=(9, 5))
  ax = fig.add_subplot()
  for policy in policies:
    for i, b in enumerate(bits):
      series = sorted((_kept_mib(r), r[metric]) for r in points
                      if r["policy"] == policy and r.get("kv_bits", 16) == b)
      if not series:
        continue
      xs, ys = zip(*series)
      name = policy if len(bits) == 1 else f"{policy}, {b:g}-bit"
      ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], color=colors[policy],
              linestyle="-" if len(series) > 1 else "none", label=name)
  front = pareto_front([(_kept_mib(r), r[metric]) for r in points], higher)
  fx, fy = zip(*front)
  ax.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1,
          alpha=0.6, label="Pareto front")
  xs = [_kept_mib(r) for r in points]
  if max(xs) > 8 * min(xs):
    ax.set_xscale("log")
  ys = [r[metric] for r in points]
  if metric == "ppl" and max(ys) > 5 * min(ys):
    ax.set_yscale("log")
  _plain_ticks(ax.xaxis)
  _plain_ticks(ax.yaxis)
  ax.set_xlabel("KV cache payload kept (MiB)" if any(_compressed(r) for r in points)
                else "KV cache payload (MiB)")
  ax.set_ylabel("perplexity (lower is better)" if metric == "ppl"
                else f"{metric} (higher is better)")
  ax.set_title(f"{'Perplexity' if metric == 'ppl' else metric.capitalize()} vs "
               f"KV memory ({', '.join(tasks)}, context {_contexts(points)})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return fig


def _plain_ticks(axis) -> None:
  """Plain numbers (20, 50, 100) on a log axis instead of 3x10^1."""
  axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(FormatStrFormatter("%g"))
  axis.set_minor_formatter(FormatStrFormatter(""))


def _contexts(records: list[dict]) -> str:
  return "/".join(str(c) for c in sorted({r["context"] for r in records}))


def ppl_by_position(records: list[dict]) -> Figure | None:
  """Perplexity along the stream, one panel per budget. Full-precision cells
  without a budget (``full``) are the reference, drawn in every panel;
  budget-free quantized cells get a panel of their own."""
  curves = [r for r in records if r.get("ppl_by_position")]
  if not curves:
    return None
  references = [r for r in curves
                if not r.get("budget") and r.get("kv_bits", 16) >= 16]
  others = [r for r in curves if r not in references]
  budgets = sorted({r.get("budget") or 0 for r in others}) or [0]
  colors = _colors(sorted({label(r, budget=False) for r in others}))
  cols = min(len(budgets), 3)
  rows = -(-len(budgets) // cols)
  fig = Figure(figsize=(5.5 * cols, 4 * rows))
  for i, budget in enumerate(budgets):
    ax = fig.add_subplot(rows, cols, i + 1)
    panel = [r for r in others if (r.get("budget") or 0) == budget]
    for r in references + panel:
      buckets = r["ppl_by_position"]
      xs = [(b["start"] + b["end"]) / 2 for b in buckets]
      ys = [b["ppl"] for b in buckets]
      reference = r in references
      name = label(r, budget=False)
      ax.plot(xs, ys, marker="." if not reference else None,
              color="black" if reference else colors[name],
              linestyle="--" if reference else "-", label=name)
    ax.set_xlabel("token position in the stream")
    ax.set_ylabel("perplexity (per position bucket)")
    ax.set_title(f"budget {budget:g} tokens" if budget else "no eviction")
    ys_all = [b["ppl"] for r in references + panel for b in r["ppl_by_position"]]
    if ys_all and max(ys_all) > 5 * min(ys_all):
      ax.set_yscale("log")
      _plain_ticks(ax.yaxis)
    ax.grid(True, alpha=0.3)
  legend = {}
  for ax in fig.axes:
    for handle, name in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(name, handle)
  fig.suptitle(f"Perplexity by position (context {_contexts(curves)})")
  fig.tight_layout()
  fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center left",
             bbox_to_anchor=(1.0, 0.5))
  return fig


def _depth_records(record: dict) -> list[tuple[float, int, float]]:
  """(depth, length, accuracy) triples of a retrieval cell."""
  out = []
  for item in record.get("samples") or record.get("by_depth") or []:
    if not isinstance(item, dict) or "depth" not in item:
      continue
    accuracy = item.get("accuracy", item.get("correct"))
    if accuracy is None:
      continue
    length = item.get("length", item.get("context", record["context"]))
    out.append((float(item["depth"]), int(length), float(accuracy)))
  return out


def accuracy_heatmap(records: list[dict]) -> Figure | None:
  """Accuracy of each cell (rows: task, policy, budget, bits) at each context
  length and needle depth (columns), in one matrix."""
  groups: dict[str, list] = collections.defaultdict(list)
  for r in records:
    triples = _depth_records(r)
    if triples:
      groups[f"{r['task']}: {label(r)}"].extend(triples)
  if not groups:
    return None
  columns = sorted({(n, d) for t in groups.values() for d, n, _ in t})
  names = sorted(groups, key=lambda g: (g.split(": ")[0], " full" not in g, g))
  grid = np.full((len(names), len(columns)), np.nan)
  for i, name in enumerate(names):
    hits = collections.defaultdict(list)
    for d, n, a in groups[name]:
      hits[(n, d)].append(a)
    for (n, d), values in hits.items():
      grid[i, columns.index((n, d))] = np.mean(values)
  fig = Figure(figsize=(3.5 + 0.7 * len(columns), 1.5 + 0.3 * len(names)))
  ax = fig.add_subplot()
  image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  if grid.size <= 400:
    for (y, x), value in np.ndenumerate(grid):
      if not np.isnan(value):
        ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(columns)), [f"{d:.0%}\n{n}" for n, d in columns],
                fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel("needle depth (% of context) / context length (tokens)")
  ax.set_title("Retrieval accuracy by needle depth and context length")
  fig.colorbar(image, ax=ax, label="retrieval accuracy (0-1)")
  fig.tight_layout()
  return fig


def _ttft(record: dict, which: str) -> float | None:
  """Seconds of the cold or warm time to first token, from ``*_s`` or ``*_ms``."""
  for key, scale in ((f"ttft_{which}_s", 1.0), (f"ttft_{which}_ms", 1e-3)):
    if isinstance(record.get(key), (int, float)):
      return record[key] * scale
  return None


def ttft_cold_warm(records: list[dict]) -> Figure | None:
  """Time to first token, recompute (cold) vs cached prefix (warm), per cell."""
  cells = [r for r in records if _ttft(r, "cold") is not None
           and _ttft(r, "warm") is not None]
  if not cells:
    return None
  names = [f"{r['task']}: {label(r)}, ctx {r['context']}" for r in cells]
  cold = np.array([_ttft(r, "cold") for r in cells]) * 1e3
  warm = np.array([_ttft(r, "warm") for r in cells]) * 1e3
  y = np.arange(len(cells))
  fig = Figure(figsize=(8, 1.5 + 0.5 * len(cells)))
  ax = fig.add_subplot()
  ax.barh(y - 0.2, cold, 0.4, label="cold (recompute prefix)", color="tab:red")
  ax.barh(y + 0.2, warm, 0.4, label="warm (cached prefix)", color="tab:green")
  for yi, c, w in zip(y, cold, warm):
    ax.text(max(c, w), yi, f"  {c / w:.1f}x" if w > 0 else "", va="center",
            fontsize=8)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel("time to first token (ms)")
  ax.set_title("Time to first token: cold vs warm")
  ax.legend(fontsize=8)
  ax.grid(True, axis="x", alpha=0.3)
  fig.tight_layout()
  return fig


def plan_heatmap(plans: dict, widths=(2, 3, 4, 8)) -> Figure:
  """Bits of every (layer, kv head) of each quant plan, one panel per plan
  (``{title: plan}``; a plan is a ``QuantPlan`` or its [L][K] format names):
  layers down, heads across, one colour per width."""
  from matplotlib.colors import BoundaryNorm, ListedColormap
  from lmcache_jax.numerics.formats import FORMATS
  grids = {title: np.array([[FORMATS[f].bits for f in row] for row in
                            getattr(plan, "formats", plan)])
           for title, plan in plans.items()}
  widths = sorted(set(widths) | {int(b) for g in grids.values()
                                 for b in np.unique(g)})
  cmap = ListedColormap(["#d73027", "#fc8d59", "#91bfdb", "#4575b4",
                         "#313695"][:len(widths)])
  edges = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:])]
  norm = BoundaryNorm(edges + [widths[-1] + 0.5], cmap.N)
  layers = max(g.shape[0] for g in grids.values())
  fig = Figure(figsize=(1.2 + 1.6 * len(grids), 1.2 + 0.16 * layers))
  axes = fig.subplots(1, len(grids), squeeze=False)[0]
  for ax, (title, grid) in zip(axes, grids.items()):
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    for (y, x), bits in np.ndenumerate(grid):
      ax.text(x, y, str(bits), ha="center", va="center", fontsize=6,
              color="white")
    ax.set_xticks(range(grid.shape[1]), range(grid.shape[1]), fontsize=7)
    ax.set_yticks(range(0, grid.shape[0], 5), range(0, grid.shape[0], 5),
                  fontsize=7)
    ax.set_xlabel("kv head", fontsize=8)
    ax.set_title(f"{title}\navg {grid.mean():.2f} bits", fontsize=8)
  axes[0].set_ylabel("layer", fontsize=8)
  bar = fig.colorbar(image, ax=list(axes), ticks=widths, fraction=0.08)
  bar.set_label("bits", fontsize=8)
  return fig


# File name -> plot function; each returns None when it has nothing to draw.
STANDARD: dict[str, Callable[[list[dict]], Figure | None]] = {
    "ppl_vs_kv_bytes.png": lambda rs: quality_vs_memory(rs, "ppl"),
    "accuracy_vs_kv_bytes.png": lambda rs: quality_vs_memory(rs, "accuracy"),
    "ppl_by_position.png": ppl_by_position,
    "accuracy_by_depth_length.png": accuracy_heatmap,
    "ttft_cold_warm.png": ttft_cold_warm,
}


def standard_plots(records: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Draws every standard plot that ``records`` have data for."""
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, plot in STANDARD.items():
    fig = plot(records)
    if fig is not None:
      fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
      written.append(out_dir / name)
  return written
