"""Prefix reuse suite: time to first token, recompute vs a hit in each tier.

  python -m experiments.bench --suite=reuse          # Llama-2-13B shapes, 4K, 32K
  python -m experiments.benchmarks.reuse             # the same without the dispatcher

For each context and cache format (bf16, and 4-bit packed), a random prompt
of ``context`` tokens is prefilled from scratch (recompute), its whole
chunks are stored, and the time to first token is measured again with the
prefix (all chunks but the one holding the last token) loaded from the host
tier (pinned host memory), the disk tier (files just written, so mostly the
page cache) and the device tier (HBM, where the card has room), prefilling
only the rest. Host-to-device throughput of the store's loads is compared
with the link measured in the same run (one large pinned transfer). Before
timing, warm logits are compared with the recompute's.

Every row also gives the speed-up against Hugging Face transformers' cold
time to first token on the same shapes and card (``_hf_baseline``, run first
in a child process; the column is empty where PyTorch is not installed).

Random weights of the model's real shapes (``models.llama.random_weights``,
drawn on the device). Config fields (all optional; defaults and their
meaning in ``configs/bench/reuse.py``): preset, contexts, formats,
chunk_size, prefill_chunk, disk_dir, repeats, time_budget_s, hf_baseline,
link_bytes.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.bench import reuse as reuse_config
from experiments import benchmarks
from experiments.benchmarks import model as model_suite
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.models.llama import from_weights, random_weights
from lmcache_jax.models.presets import get_preset
from lmcache_jax.store import (DeviceTier, DiskTier, HostTier, KVStore, Layout,
                               model_fingerprint)
from lmcache_jax.store.memory import device_sharding, host_sharding
from policies.replacement.lru import LRU

GB = 1e9
DEFAULTS = reuse_config.get_config().to_dict()


def settings(config) -> dict:
  values = dict(DEFAULTS)
  if config is not None:
    unknown = sorted(set(config.keys()) - set(DEFAULTS))
    if unknown:
      raise ValueError(f"unknown reuse-suite field(s) {unknown}; valid: "
                       f"{sorted(DEFAULTS)}")
    values.update({k: config[k] for k in config.keys()})
  return values


def link_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> dict:
  """Pinned host -> device and back, one large transfer (GB/s, best of runs)."""
  device = jax.devices()[0]
  src = jax.device_put(jnp.ones(nbytes // 2, jnp.bfloat16),
                       host_sharding(device))
  jax.block_until_ready(src)
  h2d, d2h = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    on_device = jax.block_until_ready(jax.device_put(src, device_sharding(device)))
    h2d.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(jax.device_put(on_device, host_sharding(device)))
    d2h.append(time.perf_counter() - start)
    del on_device
  return {"h2d_gbps": nbytes / min(h2d) / GB, "d2h_gbps": nbytes / min(d2h) / GB,
          "memory_kind": src.sharding.memory_kind}


def free_device_bytes() -> int | None:
  memory = benchmarks.device_memory()
  if "limit" not in memory:
    return None
  return memory["limit"] - memory["in_use"]


def make_lm(preset: str, max_context: int) -> LoadedModel:
  cfg = get_preset(preset)
  cfg = type(cfg)(**{**cfg.__dict__, "max_context": max(cfg.max_context,
                                                        max_context)})
  weights = random_weights(cfg, seed=0, dtype=jnp.bfloat16)
  return LoadedModel.from_module(from_weights(cfg, weights, jnp.bfloat16),
                                 source=f"random:{preset}")


def cache_factory(lm: LoadedModel, fmt: str):
  if fmt == "bf16":
    return lambda b, s: init_cache(lm.cfg, b, s, jnp.bfloat16)
  from lmcache_jax.quant.plan import QuantPlan
  plan = QuantPlan.uniform(lm.cfg, fmt, group_size=64)
  return lambda b, s: init_cache(lm.cfg, b, s, jnp.bfloat16, quant=plan)


def recompute(lm, new_cache, prompt, capacity, prefill_chunk):
  """Time to first token with nothing cached: a fresh cache, the whole prefill."""
  def run():
    cache = new_cache(1, capacity)
    logits, cache = prefill(lm, cache, [prompt], lm_policy(), prefill_chunk)
    return logits, cache
  return run


def lm_policy():
  from lmcache_jax.cache.policy import KeepAll
  return KeepAll()


def time_recompute(run, repeats):
  """Median time of ``run()`` after one untimed run, and its last result.

  The previous result is dropped before each run, so two caches of a long
  context never share the card.
  """
  times, result = [], None
  for i in range(repeats + 1):
    result = None
    gc.collect()
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    if i:
      times.append(time.perf_counter() - start)
  return float(np.median(times)), result


def warm_ttft(lm, store, new_cache, prompt, capacity, prefill_chunk, repeats,
              warmup=1):
  """Median TTFT of ``generate_with_store`` (after ``warmup`` untimed runs)
  and the last run."""
  times, result = [], None
  for i in range(repeats + warmup):
    result = generate_with_store(lm, [prompt], store, max_new_tokens=1,
                                 capacity=capacity, prefill_chunk=prefill_chunk,
                                 new_cache=new_cache, store_generated=False)
    result.generation.cache = None  # frees the card for the next run
    gc.collect()
    if i >= warmup:
      times.append(result.ttft_s)
  return float(np.median(times)), result


def load_throughput(store, new_cache, prompt, capacity, usable, runs=2):
  """GB/s of ``load_into`` alone (chunks moved and written into a cache)."""
  best = None
  for _ in range(runs):
    cache = jax.block_until_ready(new_cache(1, capacity))
    start = time.perf_counter()
    cache, prefix = store.load_into(cache, 0, prompt, usable)
    jax.block_until_ready(cache)
    seconds = time.perf_counter() - start
    best = seconds if best is None else min(best, seconds)
    del cache
  return len(prefix.sources) * store.chunk_nbytes / best / GB


def transformers_ttft(preset: str, contexts, repeats: int) -> dict[int, float]:
  """transformers' cold time to first token per context (batch 1), from the
  model suite's child-process baseline; {} where it cannot run."""
  if not model_suite.hf_available():
    return {}
  request = ml_collections.ConfigDict(dict(
      decode_tokens=1, repeats=repeats, max_seconds=30.0, hf_timeout_s=300,
      hf_caches=("dynamic",)))   # a cold prefill is eager either way
  works = [model_suite.Workload(c, 1, "full") for c in contexts]
  out = model_suite.run_hf_baseline(get_preset(preset), works, request)
  return {row["context"]: row["ttft_s"] for row in out["rows"]
          if "ttft_s" in row}


def run(config=None) -> dict:
  cfg = settings(config)
  hf = (transformers_ttft(cfg["preset"], cfg["contexts"], cfg["repeats"])
        if cfg["hf_baseline"] else {})
  started = time.perf_counter()
  link = link_bandwidth(cfg["link_bytes"])
  print(f"link: {link}", flush=True)
  lm = make_lm(cfg["preset"], max(cfg["contexts"]) + 64)
  fingerprint = model_fingerprint(lm)
  disk_root = cfg["disk_dir"] or tempfile.mkdtemp(prefix="reuse-bench-")
  rows, notes = [], []
  rng = np.random.default_rng(0)
  for fmt in cfg["formats"]:
    for context in cfg["contexts"]:
      elapsed = time.perf_counter() - started
      if elapsed > cfg["time_budget_s"]:
        notes.append(f"{fmt}@{context}: skipped, time budget spent "
                     f"({elapsed:.0f} s)")
        continue
      try:
        rows += bench_one(lm, fingerprint, fmt, context, cfg, rng, link,
                          os.path.join(disk_root, f"{fmt}-{context}"), notes,
                          hf.get(context))
      except Exception as e:  # noqa: BLE001 -- one workload failing is a row
        notes.append(f"{fmt}@{context}: failed: {type(e).__name__}: {e}"[:400])
      gc.collect()
      print(f"[{time.perf_counter() - started:.0f} s] {fmt}@{context} done",
            flush=True)
  shutil.rmtree(disk_root, ignore_errors=True)
  for note in notes:
    print(note)
  return {"rows": rows, "link": link, "notes": notes}


def bench_one(lm, fingerprint, fmt, context, cfg, rng, link, disk_dir, notes,
              hf_ttft=None):
  chunk, pchunk, repeats = cfg["chunk_size"], cfg["prefill_chunk"], cfg["repeats"]
  new_cache = cache_factory(lm, fmt)
  prompt = [int(t) for t in rng.integers(3, lm.cfg.vocab_size, context)]
  capacity = context + 64
  usable = (context - 1) // chunk * chunk
  long = context > 8192

  cold_s, (cold_logits, cold_cache) = time_recompute(
      recompute(lm, new_cache, prompt, capacity, pchunk),
      1 if long else repeats)
  layout = Layout.of(new_cache(1, chunk))
  chunk_bytes = layout.chunk_nbytes(chunk)
  prefix_bytes = usable // chunk * chunk_bytes
  room = prefix_bytes + 4 * chunk_bytes
  store = KVStore(layout,
                  [HostTier(room, LRU()), DiskTier(disk_dir, room, LRU())],
                  model_fingerprint=fingerprint, chunk_size=chunk)
  start = time.perf_counter()
  store.store(prompt[:usable], cold_cache, wait=True)
  store_s = time.perf_counter() - start
  del cold_cache
  gc.collect()

  base = dict(format=fmt, context=context, prefix_tokens=usable,
              prefix_gb=round(prefix_bytes / GB, 3),
              recompute_ttft_s=cold_s, transformers_ttft_s=hf_ttft)
  versus = lambda ttft: dict(  # noqa: E731
      speedup=cold_s / ttft,
      vs_transformers=None if hf_ttft is None else hf_ttft / ttft)
  rows = [dict(base, hit="none (recompute)", ttft_s=cold_s, **versus(cold_s))]

  def add(hit, store_, extra=None):
    # Compilation happens in the first (host) runs; disk runs are slow and
    # need no warm-up.
    ttft, result = warm_ttft(lm, store_, new_cache, prompt, capacity, pchunk,
                             1 if long and hit == "disk" else repeats,
                             warmup=int(hit == "host"))
    logits = np.asarray(result.generation.prompt_logits, np.float32)
    want = np.asarray(cold_logits, np.float32)
    row = dict(base, hit=hit, ttft_s=ttft, **versus(ttft),
               hit_tokens=result.hit_tokens[0],
               tiers=",".join(f"{k}:{v}" for k, v in result.sources[0].items()),
               max_logit_diff=float(np.abs(logits - want).max()),
               same_argmax=bool((logits.argmax(-1) == want.argmax(-1)).all()))
    row.update(extra or {})
    rows.append(row)
    print(row, flush=True)

  gbps = load_throughput(store, new_cache, prompt, capacity, usable)
  add("host", store, dict(load_gbps=gbps, link_fraction=gbps / link["h2d_gbps"],
                          store_host_and_disk_s=store_s))
  store.close()
  del store  # frees the host tier's copies
  # the same files, read from disk by a tier that adopts them
  disk_store = KVStore(layout, [DiskTier(disk_dir, room, LRU())],
                       model_fingerprint=fingerprint, chunk_size=chunk)
  add("disk", disk_store, dict(load_gbps=load_throughput(
      disk_store, new_cache, prompt, capacity, usable, runs=1)))
  disk_store.close()
  free = free_device_bytes()
  cache_bytes = new_cache(1, capacity)
  needed = prefix_bytes + 2 * sum(x.nbytes for x in jax.tree.leaves(cache_bytes))
  del cache_bytes
  if free is not None and free < needed * 1.2:
    notes.append(f"{fmt}@{context}: device hit skipped: needs ~{needed / GB:.1f}"
                 f" GB of HBM for the device tier and two caches, "
                 f"{free / GB:.1f} GB free")
    return rows
  device_store = KVStore(layout, [DeviceTier(room, LRU())],
                         model_fingerprint=fingerprint, chunk_size=chunk)
  logits, cache = recompute(lm, new_cache, prompt, capacity, pchunk)()
  device_store.store(prompt[:usable], cache)
  del cache, logits
  gc.collect()
  gc.collect()
  add("device", device_store)
  device_store.close()
  return rows


if __name__ == "__main__":
  out = run()
  print(f"device: {benchmarks.device_name()}")
  from experiments.bench import table
  print(table(out["rows"]))
