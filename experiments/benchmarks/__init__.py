"""Benchmark suites, one module each, found by name by ``experiments.bench``.

A suite is a module ``experiments/benchmarks/<name>.py`` defining

  run(config) -> dict   # {"rows": [dict, ...], ...anything else to record}

where ``config`` comes from ``configs/bench/<name>.py`` (``get_config(arg)``),
or from ``--config``; it is None when the suite has no config file. Each row
becomes a line of the printed Markdown table; the whole dict is saved as JSON.
Modules whose name starts with ``_`` serve the suites and are not suites
(``_hf_baseline``: the transformers baseline; ``_checks``: kernel results
against their references).

The helpers below are shared by the suites, so every number is taken the
same way: device work is synchronized before a clock is read, the first runs
(compilation) are left out, and the median of the timed runs is reported.
``timed`` waits for each call; ``timed_back_to_back`` issues a batch of calls
and waits once (the device's time per call).
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def suites() -> list[str]:
  """Names of the suite modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_"))


def load_suite(name: str):
  """The suite module ``name``; a clear error listing the valid ones."""
  if name not in suites():
    raise ValueError(f"unknown benchmark suite {name!r}; valid: "
                     f"{', '.join(suites())}")
  module = importlib.import_module(f"{__name__}.{name}")
  if not callable(getattr(module, "run", None)):
    raise ValueError(f"benchmark suite {name!r} defines no run(config)")
  return module


def sync(tree: Any) -> Any:
  """Blocks until every array of ``tree`` is computed; returns it."""
  return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
          max_seconds: float | None = None) -> dict:
  """Median wall time of ``fn()`` (synchronized), after ``warmup`` calls.

  Stops early once the timed calls took ``max_seconds`` in all (at least one
  is timed). Each result is dropped before the next call, so two never hold
  memory at once. Returns {"median_s", "min_s", "runs", "result"} with the
  last result.
  """
  result = None
  for _ in range(warmup):
    result = None  # the last result is freed before the next call allocates
    result = sync(fn())
  times = []
  while len(times) < max(repeats, 1):
    result = None
    start = time.perf_counter()
    result = sync(fn())
    times.append(time.perf_counter() - start)
    if max_seconds is not None and sum(times) >= max_seconds:
      break
  return {"median_s": statistics.median(times), "min_s": min(times),
          "runs": len(times), "result": result}


def timed_back_to_back(fn: Callable[[], Any], *, calls: int = 20,
                       repeats: int = 5) -> dict:
  """Seconds per call when ``calls`` calls of ``fn`` are issued without
  waiting in between, as a decode loop issues them: the host's dispatch
  overlaps the device's work, so this is the device's time per call (what
  a call timed alone adds on top is launch and synchronization latency).
  Median over ``repeats`` batches, after one batch of warm-up. Returns
  {"median_s", "min_s", "runs"} (``runs`` = batches timed)."""
  if calls < 1 or repeats < 1:
    raise ValueError(f"calls ({calls}) and repeats ({repeats}) must be >= 1")

  def batch() -> float:
    start = time.perf_counter()
    results = [fn() for _ in range(calls)]
    sync(results)
    return (time.perf_counter() - start) / calls

  batch()
  times = [batch() for _ in range(repeats)]
  return {"median_s": statistics.median(times), "min_s": min(times),
          "runs": len(times)}


def copy_bandwidth(nbytes: int = 2**31) -> float:
  """Bytes/s of an elementwise pass over ``nbytes`` (half read, half written).

  The passes are chained through a donated buffer, so no more than two
  buffers of ``nbytes / 2`` exist at once: the measurement does not raise
  the process's peak memory, which the model suite reports.
  """
  bump = jax.jit(lambda a: a + 1, donate_argnums=0)
  x = sync(bump(jnp.ones((nbytes // 8,), jnp.float32)))   # compiled, warm
  size = x.nbytes
  times = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
      x = bump(x)
    sync(x)
    times.append((time.perf_counter() - start) / 10)
  return 2 * size / statistics.median(times)


def device_memory() -> dict:
  """Bytes in use and the process's peak on the first device; empty where the
  backend keeps no statistics (the CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  keys = {"bytes_in_use": "in_use", "peak_bytes_in_use": "peak",
          "bytes_limit": "limit"}
  return {short: stats[key] for key, short in keys.items() if key in stats}


def skip_note(need: int, share: float = 0.97) -> str:
  """"" when ``need`` bytes fit in ``share`` of the device's memory limit
  (or the backend states none: the CPU), else the note of a row skipped
  for it, with both numbers."""
  limit = device_memory().get("limit")
  if limit is None or need <= share * limit:
    return ""
  return (f"skipped: needs ~{need / 2**30:.1f} GiB, the card gives "
          f"{limit / 2**30:.1f} GiB")


def is_out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` is the runtime's out-of-memory error."""
  return (isinstance(error, jax.errors.JaxRuntimeError)
          and "RESOURCE_EXHAUSTED" in str(error))


def row_or_skipped(head: dict, make_row: Callable[[], dict]) -> dict:
  """``make_row()``, or ``head`` noted as skipped where it runs out of device
  memory (an estimate that was too low), so one row cannot stop a suite
  before its table is written. Other errors propagate."""
  try:
    return make_row()
  except Exception as e:  # noqa: BLE001 -- only out-of-memory is kept
    if not is_out_of_memory(e):
      raise
    first = str(e).strip().splitlines()[0][:200]
    return {**head, "note": f"skipped: out of memory when run ({first})"}


def device_name() -> str:
  device = jax.local_devices()[0]
  return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"
