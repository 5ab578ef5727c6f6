"""Whole-model suite: prefill, time to first token, decode tokens/s, memory.

  python -m experiments.bench --suite=model                    # Llama-2-13B shapes
  python -m experiments.bench --suite=model --config=configs/bench/model.py:runlocal

Each workload ``CONTEXTxBATCH:POLICY`` feeds ``batch`` random prompts of
``context - decode_tokens`` tokens through this project's engine, then decodes
``decode_tokens`` greedy tokens in one on-device loop, into a cache sized for
the whole context, with random weights of the model's real shapes. The
``full`` policy prefills each prompt in one pass; evicting policies stream it
in ``prefill_chunk``-token chunks. Decode rows give the bytes a step must read
(weights plus the live keys and values) over the copy bandwidth measured in
the same run: the bound, and the share of it reached. The
``full`` policy in the model's dtype is the project's own baseline; where
PyTorch and transformers are installed, Hugging Face ``generate`` runs the same
shapes on the same card in a child process first (two frameworks cannot share
one card's memory in one process), after checking that both compute the same
function on a small model.

A workload whose estimated memory exceeds the card is skipped with the
numbers, not attempted; one that runs out of memory all the same becomes a
skipped row (``benchmarks.row_or_skipped``), so the table is always written. Peak memory comes from the backend's statistics
(the process-wide peak, so workloads run smallest first).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from experiments.benchmarks import _kv_decode as kv_decode
from lmcache_jax import models
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.engine import Sampling, prefill
from lmcache_jax.engine import steps
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.presets import get_preset
from lmcache_jax.models.weights import expected_shapes
from policies.registry import EVICTION, parse_spec

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Workload:
  context: int
  batch: int
  policy: str

  @classmethod
  def parse(cls, spec: str) -> Workload:
    """``"4096x16:full"`` or ``"32768x16:attention_sink(budget=2048)"``."""
    shape, sep, policy = spec.partition(":")
    context, x, batch = shape.partition("x")
    if not (sep and x and context.isdigit() and batch.isdigit()):
      raise ValueError(f"workload {spec!r} is not CONTEXTxBATCH:POLICY, "
                       f"e.g. 4096x16:full")
    parse_spec(policy)
    return cls(int(context), int(batch), policy)

  def __str__(self):
    return f"{self.context}x{self.batch}:{self.policy}"


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
  return sum(math.prod(s) for s in expected_shapes(cfg).values()) * itemsize


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, itemsize: int) -> int:
  """Keys and values, plus the int32 positions and float32 scores per slot."""
  slots = cfg.num_layers * batch * cfg.num_kv_heads * capacity
  return slots * (2 * cfg.head_dim * itemsize + 8)


def transient_bytes(cfg: ModelConfig, batch: int, chunk: int) -> int:
  """Largest per-chunk temporaries: one block of float32 logits and
  probabilities over cached slots (the chunk's own attention is flash), the
  MLP activations, and float32 last-token logits."""
  attention = 2 * batch * cfg.num_heads * chunk * 512 * 4
  mlp = 3 * batch * chunk * cfg.intermediate_size * 4
  return attention + mlp + batch * cfg.vocab_size * 4


def bench_engine(lm: models.LoadedModel, work: Workload, config,
                 bandwidth: float) -> dict:
  """Times one workload through the engine; returns its table row.
  ``bandwidth``: the card's copy bandwidth in bytes/s, for the decode bound."""
  cfg, itemsize = lm.cfg, jnp.dtype(lm.dtype).itemsize
  policy = EVICTION.make(work.policy).bind(cfg)
  prompt_len = work.context - config.decode_tokens
  one_pass = parse_spec(work.policy)[0] == "full"
  chunk = prompt_len if one_pass else config.prefill_chunk
  capacity = policy.cache_capacity(work.context, chunk, config.decode_tokens)
  row = {"impl": "lmcache_jax", "context": work.context, "batch": work.batch,
         "policy": work.policy, "prompt_tokens": prompt_len,
         "kv_gib": cache_bytes(cfg, work.batch, capacity, itemsize) / GIB}
  need = (weight_bytes(cfg, itemsize) + cache_bytes(cfg, work.batch, capacity, itemsize)
          + transient_bytes(cfg, work.batch, chunk))
  note = benchmarks.skip_note(need)
  if note:
    return {**row, "note": note}
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (work.batch, prompt_len)).tolist()

  def run_prefill(tokens):
    cache = init_cache(cfg, work.batch, capacity, lm.dtype)
    logits, cache = prefill(lm, cache, tokens, policy,
                            None if one_pass else chunk)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache

  # Compile prefill and decode. The warm-up prompt takes the same path as the
  # timed one: it fits in the cache only if the timed prompt does (prefill
  # then compresses once at the end), else it streams with eviction.
  warm = [p[:min(prompt_len, capacity + chunk)] for p in prompts]
  first, _, cache = benchmarks.sync(run_prefill(warm))
  decode = _decoder(lm, policy.decoding(), config.decode_tokens)
  benchmarks.sync(decode(cache, first))
  del cache
  timing = benchmarks.timed(lambda: run_prefill(prompts), warmup=0,
                            repeats=config.repeats, max_seconds=config.max_seconds)
  first, logits, cache = timing.pop("result")
  if not bool(jnp.isfinite(logits).all()):
    raise FloatingPointError(f"{work}: non-finite logits after prefill")
  del logits
  memory = benchmarks.device_memory()
  start = time.perf_counter()
  tokens, cache = benchmarks.sync(decode(cache, first))
  step = (time.perf_counter() - start) / config.decode_tokens
  memory_after = benchmarks.device_memory()
  if not bool((tokens >= 0).all()):
    raise AssertionError(f"{work}: the decode loop stopped before its "
                         f"{config.decode_tokens} steps")
  del cache
  live = prompt_len + config.decode_tokens / 2
  live = min(live, getattr(policy, "budget", live) + 1)
  step_bytes = (weight_bytes(cfg, itemsize)
                + live * work.batch * cfg.num_layers * cfg.num_kv_heads
                * 2 * cfg.head_dim * itemsize)
  peak = (max(memory.get("peak", 0), memory_after.get("peak", 0))
          if memory else None)
  resident = weight_bytes(cfg, itemsize) + cache_bytes(cfg, work.batch,
                                                        capacity, itemsize)
  row.update({
      "ttft_s": timing["median_s"], "runs": timing["runs"],
      "prefill_tok_s": work.batch * prompt_len / timing["median_s"],
      "decode_ms_step": step * 1e3, "decode_tok_s": work.batch / step,
      "step_gb": step_bytes / 1e9,
      "bound_ms": step_bytes / bandwidth * 1e3,
      "of_bound": step_bytes / bandwidth / step,
      "peak_gib": peak / GIB if peak else None,
      "peak_over_resident": peak / resident if peak else None,
      "note": "",
  })
  return row


def _decoder(lm, policy, num_steps: int):
  """decode(cache, tokens) → (tokens [B, num_steps], cache): greedy steps in
  one on-device loop that never stops early (no stop tokens)."""
  key = jax.random.key(0)
  no_stop = jnp.zeros((0,), jnp.int32)

  def decode(cache, tokens):
    return steps.decode_loop(
        lm.graphdef, lm.params, cache, tokens, jnp.ones(tokens.shape, bool),
        key, no_stop, num_steps=num_steps, policy=policy, sampling=Sampling())
  return decode


def with_ratios(row: dict, peers: list[dict]) -> dict:
  """``row`` (the engine's) with, per timed transformers row in ``peers``,
  how many times faster the engine is: ``ttft_x_<cache>`` and
  ``decode_x_<cache>`` (their time over ours; above 1 = the engine is
  faster), ``<cache>`` being the peer's (``_hf_baseline.CACHES``)."""
  row = dict(row)
  for peer in peers:
    if "ttft_s" not in peer or "ttft_s" not in row:
      continue
    cache = peer["cache"]
    row[f"ttft_x_{cache}"] = peer["ttft_s"] / row["ttft_s"]
    row[f"decode_x_{cache}"] = peer["decode_ms_step"] / row["decode_ms_step"]
  return row


def hf_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def run_hf_baseline(cfg: ModelConfig, workloads: list[Workload], config) -> dict:
  """Runs ``_hf_baseline`` in a child process; returns its JSON report."""
  request = {"model": dataclasses.asdict(cfg),
             "workloads": [dataclasses.asdict(w) for w in workloads],
             "caches": list(config.get("hf_caches", ("dynamic", "static"))),
             "decode_tokens": config.decode_tokens, "repeats": config.repeats,
             "max_seconds": config.max_seconds}
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child's JAX only checks, on the CPU
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks._hf_baseline", json.dumps(request)],
      capture_output=True, text=True, env=env, timeout=config.hf_timeout_s)
  sys.stderr.write(proc.stderr[-4000:])
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"the transformers baseline failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def run(config) -> dict:
  workloads = [Workload.parse(w) for w in config.workloads]
  cfg = get_preset(config.model)
  dtype = jnp.dtype(config.dtype) if config.dtype != "auto" else None
  itemsize = jnp.dtype(dtype or jnp.bfloat16).itemsize
  capacity = lambda w: EVICTION.make(w.policy).cache_capacity(  # noqa: E731
      w.context, config.prefill_chunk, config.decode_tokens)
  order = sorted(workloads,
                 key=lambda w: cache_bytes(cfg, w.batch, capacity(w), itemsize))
  out: dict = {"rows": [], "workloads": [str(w) for w in order]}
  hf_rows = []
  if config.hf_baseline and hf_available():
    full = [w for w in order if parse_spec(w.policy)[0] == "full"]
    try:
      hf = run_hf_baseline(cfg, full, config)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      # the engine's rows are still worth their time; the record says why
      # they stand alone
      out["hf_check"] = f"failed: {type(e).__name__}: {e}"[:2000]
    else:
      out["hf_check"] = hf["check"]
      out["hf_versions"] = hf["versions"]
      hf_rows = hf["rows"]
  else:
    out["hf_check"] = "not run: " + ("disabled" if not config.hf_baseline
                                     else "torch or transformers not installed")
  start = time.perf_counter()
  lm = models.load(f"random:{config.model}", dtype, seed=config.seed)
  out["load_s"] = time.perf_counter() - start
  bandwidth = benchmarks.copy_bandwidth(config.copy_bytes)
  out["copy_gb_s"] = bandwidth / 1e9
  rows = []
  for work in order:
    head = {"impl": "lmcache_jax", "context": work.context,
            "batch": work.batch, "policy": work.policy}
    rows.append(benchmarks.row_or_skipped(
        head, lambda: bench_engine(lm, work, config, bandwidth)))
    gc.collect()
    print(json.dumps(rows[-1]), flush=True)
  # Each engine row, then the transformers rows of the same shape beside it.
  for row in rows:
    peers = [h for h in hf_rows if (h["context"], h["batch"]) ==
             (row["context"], row["batch"]) and row["policy"] == "full"]
    out["rows"] += [with_ratios(row, peers), *peers]
  if config.get("kv_decode") and config.kv_decode.workloads:
    del lm   # the quantized-cache rows load their own model
    out["rows"] += kv_decode.run_kv_decode(config.kv_decode, bandwidth)
  return out
