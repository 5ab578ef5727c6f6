"""A/B timing of one code tree: prefill and decode on Llama-2-13B shapes.

Run once per tree in one call on the device, so both share a card:

  PYTHONPATH=<tree> python3 experiments/benchmarks/_engine_ab.py <label>

Prints one JSON line per context (4K and 32K, batch 1, full bf16 cache).
"""
import sys, time, json, jax, jax.numpy as jnp, numpy as np
from lmcache_jax import models
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine import steps
from lmcache_jax.engine.sampling import Sampling
label = sys.argv[1]
lm = models.load("llama2-13b", jnp.bfloat16)
rows = []
for n in (4096, 32768):
  cap = n + 64
  toks = [list(np.random.default_rng(0).integers(0, 32000, n))]
  cache = init_cache(lm.cfg, 1, cap, jnp.bfloat16)
  _, cache = prefill(lm, cache, [toks[0][:512]], KeepAll(), chunk=512)   # compile
  del cache
  times = []
  for r in range(2 if n == 4096 else 1):
    cache = init_cache(lm.cfg, 1, cap, jnp.bfloat16)
    t = time.perf_counter(); logits, cache = prefill(lm, cache, toks, KeepAll(), chunk=512)
    logits.block_until_ready(); times.append(time.perf_counter() - t)
  tok = jnp.argmax(logits, -1).astype(jnp.int32); act = jnp.array([True]); dec = []
  for i in range(12):
    t = time.perf_counter()
    tok, _, cache = steps.decode_step(lm.graphdef, lm.params, cache, tok, act, jax.random.key(0), policy=KeepAll(), sampling=Sampling())
    tok.block_until_ready(); dec.append(time.perf_counter() - t)
  peak = jax.local_devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30
  rows.append(dict(code=label, context=n, ttft_s=round(min(times), 3), decode_ms=round(1000 * float(np.median(dec[2:])), 2), peak_gib=round(peak, 1), logit0=float(logits[0, 0])))
  del cache
  print(json.dumps(rows[-1]), flush=True)
