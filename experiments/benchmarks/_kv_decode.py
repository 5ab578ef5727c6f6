"""The model suite's quantized-cache rows: decode with an int KV cache against
a bf16 one, at a long context and a large batch, on one model in one run.

Each workload ``CONTEXTxBATCH:KV`` (KV = ``dense``, the model's dtype, or
``int2/3/4/8``) fills a cache of ``context`` slots per sequence, all but the
decoded tokens' slots, with random keys and values through the cache's own
write path (int caches quantize them as a prefill would:
rotated, int8 copies of the sinks and the latest 32 tokens), then times
``decode_tokens`` greedy steps in one on-device loop. A decode step costs the
same whatever the cached values are, so no prefill is run. Rows give the
bytes a step reads (weights plus the cache's payload), the bound those bytes
set at the copy bandwidth of the same run, and the bytes in use on the
device while decoding (weights + cache + the loop's buffers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from experiments import benchmarks
from lmcache_jax import models
from lmcache_jax.attention.layer import LayerKV, write_stacked
from lmcache_jax.cache.kv_cache import KVCache, init_cache, tree_nbytes
from lmcache_jax.engine import Sampling, steps
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant.plan import EXACT_TOKENS, QuantPlan
from policies.registry import EVICTION

GIB = 2**30
_FILL_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class KVWorkload:
  context: int
  batch: int
  kv: str          # "dense" (the model's dtype) or "int<bits>"

  @classmethod
  def parse(cls, spec: str) -> KVWorkload:
    """``"32768x16:int4"``."""
    shape, _, kv = spec.partition(":")
    context, x, batch = shape.partition("x")
    bits = kv.removeprefix("int")
    if not (x and context.isdigit() and batch.isdigit()
            and (kv == "dense" or (kv.startswith("int") and bits.isdigit()))):
      raise ValueError(f"kv workload {spec!r} is not CONTEXTxBATCH:KV with KV "
                       f"dense or int<bits>, e.g. 32768x16:int4")
    if kv != "dense":
      format_for_bits(int(bits))   # a clear error for a width with no format
    return cls(int(context), int(batch), kv)

  def __str__(self):
    return f"{self.context}x{self.batch}:{self.kv}"

  def plan(self, cfg) -> QuantPlan | None:
    if self.kv == "dense":
      return None
    fmt = format_for_bits(int(self.kv.removeprefix("int"))).name
    return QuantPlan.uniform(cfg, fmt, policy=f"uniform-{fmt}",
                             group_size=min(64, cfg.head_dim), rotate=True,
                             **EXACT_TOKENS)


@functools.partial(jax.jit, static_argnames=("count", "head_dim"),
                   donate_argnames=("cache",))
def _fill_chunk(cache: KVCache, key, start, *, count: int,
                head_dim: int) -> KVCache:
  """Writes tokens [start, start + count) of every sequence into every layer
  (slot = position), keys and values ~ N(0, 1)."""
  layers, batch, num_kv = cache.positions.shape[:3]
  positions = jnp.broadcast_to(start + jnp.arange(count, dtype=jnp.int32),
                               (batch, count))
  slots = jnp.broadcast_to(positions[:, None, :], (batch, num_kv, count))

  def layer_body(layer, kv):
    k_key, v_key = jax.random.split(jax.random.fold_in(key, layer))
    draw = lambda k: jax.random.normal(  # noqa: E731
        k, (batch, count, num_kv, head_dim), jnp.bfloat16)
    return write_stacked(kv, layer, draw(k_key), draw(v_key), positions, slots)

  kv = LayerKV(cache.keys, cache.values, cache.positions, cache.scores)
  kv = jax.lax.fori_loop(0, layers, layer_body, kv)
  return KVCache(keys=kv.keys, values=kv.values, positions=kv.positions,
                 scores=kv.scores, lengths=jnp.maximum(
                     cache.lengths, start + count).astype(jnp.int32))


def filled_cache(cfg, work: KVWorkload, capacity: int, dtype,
                 decode_tokens: int, seed: int = 0) -> KVCache:
  """A cache of ``capacity`` slots holding ``work.context - 2 *
  decode_tokens`` random tokens (``dtype``: the dense cache's, or the packed
  cache's exact copies)."""
  cache = init_cache(cfg, work.batch, capacity, dtype, quant=work.plan(cfg))
  key = jax.random.key(seed)
  tokens = work.context - 2 * decode_tokens
  for start in range(0, tokens, _FILL_CHUNK):
    cache = _fill_chunk(cache, jax.random.fold_in(key, start), start,
                        count=min(_FILL_CHUNK, tokens - start),
                        head_dim=cfg.head_dim)
  return benchmarks.sync(cache)


def bench_kv_decode(lm: models.LoadedModel, work: KVWorkload, decode_tokens: int,
                    bandwidth: float, weight_bytes: int,
                    trace_dir: str | None = None) -> dict:
  """Times ``decode_tokens`` greedy steps over a filled cache; one table row.
  ``trace_dir``: also write a profiler trace of the timed steps there."""
  cfg = lm.cfg
  row = {"impl": "lmcache_jax", "model": cfg.name, "context": work.context,
         "batch": work.batch, "kv": work.kv,
         "dtype": jnp.dtype(lm.dtype).name}
  # the context holds the filled tokens, then a warm-up run's and a timed run's
  capacity = work.context
  cache = filled_cache(cfg, work, capacity, lm.dtype, decode_tokens)
  kv_bytes = cache.payload_nbytes
  policy = EVICTION.make("full").bind(cfg).decoding()
  first = jnp.full((work.batch,), 3, jnp.int32)
  key, no_stop = jax.random.key(0), jnp.zeros((0,), jnp.int32)

  def decode(cache):
    return steps.decode_loop(
        lm.graphdef, lm.params, cache, first, jnp.ones(first.shape, bool), key,
        no_stop, num_steps=decode_tokens, policy=policy, sampling=Sampling())

  _, cache = benchmarks.sync(decode(cache))   # compiles
  in_use = benchmarks.device_memory().get("in_use")
  tracing = (jax.profiler.trace(trace_dir, create_perfetto_trace=True)
             if trace_dir else contextlib.nullcontext())
  with tracing:
    start = time.perf_counter()
    tokens, cache = benchmarks.sync(decode(cache))
    step = (time.perf_counter() - start) / decode_tokens
  if not bool((tokens >= 0).all()):
    raise AssertionError(f"{work}: the decode loop stopped early")
  del cache
  live = work.context - 0.5 * decode_tokens      # mean tokens a timed step reads
  step_bytes = weight_bytes + kv_bytes * live / capacity
  row.update({
      "kv_gib": kv_bytes / GIB,
      "decode_ms_step": step * 1e3, "decode_tok_s": work.batch / step,
      "step_gb": step_bytes / 1e9, "bound_ms": step_bytes / bandwidth * 1e3,
      "of_bound": step_bytes / bandwidth / step,
      "in_use_gib": in_use / GIB if in_use else None,
      "note": "cache filled with random tokens (no prefill)",
  })
  return row


def run_kv_decode(config, bandwidth: float) -> list[dict]:
  """The rows of ``config.workloads`` on ``config.model`` (random weights),
  smallest cache first."""
  workloads = [KVWorkload.parse(w) for w in config.workloads]
  lm = models.load(f"random:{config.model}", jnp.dtype(config.dtype), seed=0)
  weights = tree_nbytes(lm.params)
  rows = []
  for work in sorted(workloads, key=lambda w: (w.kv == "dense", w.batch * w.context)):
    rows.append(bench_kv_decode(lm, work, config.decode_tokens, bandwidth,
                                weights))
    print(rows[-1], flush=True)
  return rows
