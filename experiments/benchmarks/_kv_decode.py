"""The model suite's quantized-cache rows: decode with an int KV cache against
a bf16 one, at a long context and a large batch, on one model in one run.

Each workload ``CONTEXTxBATCH:KV`` (KV = ``dense``, the model's dtype, or
``int2/3/4/8``) fills a cache of ``context`` slots per sequence, all but the
decoded tokens' slots, with random keys and values through the cache's own
write path, then times ``decode_tokens`` greedy steps in one on-device loop.
An int cache stores them as ``--kv_bits`` does (``default_plan``: the
command line's default plan, keys centered on means measured on random
token ids). A decode step costs the same whatever the cached values are, so
no prefill is run. Rows give the bytes a step reads (weights plus the
cache's payload), the bound those bytes set at the copy bandwidth of the
same run, and the bytes in use on the device while decoding (weights +
cache + the loop's buffers).

A workload whose estimated bytes (``needed_bytes``) exceed the device's
memory is skipped with the numbers, and one that runs out of memory all the
same becomes a skipped row, so the suite always returns its table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default as default_config
from experiments import benchmarks, setup
from lmcache_jax import models
from lmcache_jax.attention.layer import LayerKV, write_stacked
from lmcache_jax.cache.kv_cache import KVCache, init_cache, tree_nbytes
from lmcache_jax.engine import Sampling, steps
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant.plan import QuantPlan
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

  @property
  def bits(self) -> int | None:
    """Code bits of an int cache; None for the dense one."""
    return None if self.kv == "dense" else int(self.kv.removeprefix("int"))


def default_plan(lm: models.LoadedModel, bits: int) -> QuantPlan:
  """The plan ``--kv_bits=bits`` stores with: ``experiments.setup.quant_plan``
  on the command line's default config, as ``experiments.run`` builds it.
  Its key centering measures the model's key means on random token ids
  (as many as the config's calibration text): random weights have no
  tokenizer to read the text with."""
  config = default_config.get_config()
  config.quant.kv_bits = bits
  ids = np.random.default_rng(0).integers(
      3, lm.cfg.vocab_size, int(config.quant.calibration_tokens))
  return setup.quant_plan(config.quant, lm, calibration_tokens=ids.tolist())


def needed_bytes(cfg, work: KVWorkload, dtype, plan: QuantPlan | None,
                 weight_bytes: int) -> int:
  """Bytes on the device while ``work`` decodes: the weights, the cache
  (its exact size, from its shapes) and the step's largest temporaries
  (float32 logits and probabilities over the slots, twice the float32
  vocabulary logits)."""
  cache = jax.eval_shape(lambda: init_cache(cfg, work.batch, work.context,
                                            dtype, quant=plan))
  step = (2 * work.batch * cfg.num_heads * work.context * 4
          + 2 * work.batch * cfg.vocab_size * 4)
  return weight_bytes + tree_nbytes(cache) + step


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
                 decode_tokens: int, plan: QuantPlan | None,
                 seed: int = 0) -> KVCache:
  """A cache of ``capacity`` slots holding ``work.context - 2 *
  decode_tokens`` random tokens, stored as ``plan`` says (None: dense
  ``dtype``; else ``dtype`` is that of the packed cache's exact copies)."""
  cache = init_cache(cfg, work.batch, capacity, dtype, quant=plan)
  key = jax.random.key(seed)
  tokens = work.context - 2 * decode_tokens
  for start in range(0, tokens, _FILL_CHUNK):
    cache = _fill_chunk(cache, jax.random.fold_in(key, start), start,
                        count=min(_FILL_CHUNK, tokens - start),
                        head_dim=cfg.head_dim)
  return benchmarks.sync(cache)


def bench_kv_decode(lm: models.LoadedModel, work: KVWorkload, decode_tokens: int,
                    bandwidth: float, weight_bytes: int,
                    plan: QuantPlan | None = None,
                    trace_dir: str | None = None) -> dict:
  """Times ``decode_tokens`` greedy steps over a filled cache stored as
  ``plan`` says (None for the dense row); one table row. ``trace_dir``:
  also write a profiler trace of the timed steps there."""
  cfg = lm.cfg
  row = {"impl": "lmcache_jax", "model": cfg.name, "context": work.context,
         "batch": work.batch, "kv": work.kv,
         "dtype": jnp.dtype(lm.dtype).name}
  if (work.bits is None) != (plan is None):
    raise ValueError(f"{work}: an int cache needs a plan, a dense one none")
  # the context holds the filled tokens, then a warm-up run's and a timed run's
  capacity = work.context
  cache = filled_cache(cfg, work, capacity, lm.dtype, decode_tokens, plan)
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
  smallest cache first; rows that do not fit the device are skipped with a
  note (``needed_bytes``; or out of memory when run)."""
  workloads = [KVWorkload.parse(w) for w in config.workloads]
  lm = models.load(f"random:{config.model}", jnp.dtype(config.dtype), seed=0)
  weights = tree_nbytes(lm.params)
  plans = {bits: default_plan(lm, bits)
           for bits in sorted({w.bits for w in workloads} - {None})}
  rows = []
  for work in sorted(workloads, key=lambda w: (w.kv == "dense", w.batch * w.context)):
    plan = plans.get(work.bits)
    head = {"impl": "lmcache_jax", "model": lm.cfg.name,
            "context": work.context, "batch": work.batch, "kv": work.kv}
    note = benchmarks.skip_note(needed_bytes(lm.cfg, work, lm.dtype, plan,
                                             weights))
    rows.append({**head, "note": note} if note else benchmarks.row_or_skipped(
        head, lambda: bench_kv_decode(lm, work, config.decode_tokens,
                                      bandwidth, weights, plan)))
    gc.collect()
    print(rows[-1], flush=True)
  return rows
