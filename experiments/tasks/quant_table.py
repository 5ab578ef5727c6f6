"""The quantization table of docs/quantization.md: perplexity and KV bytes.

  python -m experiments.run --task=quant_table

Streams ``context`` tokens of the evaluation text through a full cache
(``quant.eval_chunk`` tokens per forward pass, a speed knob only: a
quantized prefill reads the cache as decoding does) in each storage
setting: bf16 (dense), fp8, and uniform int8/int4/int3/int2 each stored
plainly, Hadamard-rotated with keys centered, with 4 exact sink tokens too,
and with an exact window of the 64 most recent tokens too (below int8: also
a 32-token window held as int8 copies, the default of ``--kv_bits``); then
every calibration policy at 2, 3 and 4 average bits (rotated and centered).
Centering and calibration read 512 tokens of another text. KV bytes are the
payload a bfloat16-storage cache of that setting allocates (codes, scales,
zeros, exact copies and maps), whatever the compute dtype of the run.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.context import RunContext
from experiments.tasks import TASKS
from experiments.tasks.perplexity import stream_nll
from experiments.texts import load_eval_text
from experiments import setup
from lmcache_jax.engine import calibration
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.quant.plan import QuantPlan


def kv_bytes(cfg, capacity: int, plan: QuantPlan | None) -> int:
  """Payload bytes of a bf16-storage cache of one sequence (no allocation)."""
  shape = jax.eval_shape(
      lambda: init_cache(cfg, 1, capacity, jnp.bfloat16, quant=plan))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves((shape.keys, shape.values)))


def settings(qconf, lm, calibration_tokens):
  """(label, plan) rows of the table, calibrating as it goes."""
  cfg = lm.cfg
  group = int(qconf.get("group_size", 64))
  residual = int(qconf.get("residual_window", 64))
  key_shift = calibration.key_means(calibration.collect(lm, calibration_tokens))
  stored = dict(rotate=True, key_shift=key_shift)
  yield "bf16", None
  yield "fp8", QuantPlan.uniform(cfg, "fp8", group_size=group, policy="uniform")
  for fmt in ("int8", "int4", "int3", "int2"):
    uniform = lambda **kw: QuantPlan.uniform(cfg, fmt, group_size=group, **kw)
    yield f"{fmt} plain", uniform()
    yield f"{fmt} rotated + centered", uniform(**stored)
    yield f"{fmt} rot. + cent. + 4 sinks", uniform(sinks=4, **stored)
    yield (f"{fmt} rot. + cent. + 4 sinks + residual {residual}",
           uniform(sinks=4, residual=residual, **stored))
    if fmt != "int8":   # the window as int8 copies, half their bytes
      yield (f"{fmt} rot. + cent. + 4 sinks + residual 32, int8 copies",
             uniform(sinks=4, residual=32, copy_bits=8, **stored))
  for name in ("variance", "sensitivity", "kvquant"):
    for bits in (2, 3, 4):
      start = time.perf_counter()
      plan = setup.quant_plan({"kv_bits": bits, "calibration": name,
                                "group_size": group}, lm, calibration_tokens)
      print(f"  calibrated {name} @ {bits} bits in "
            f"{time.perf_counter() - start:.0f}s")
      yield f"{name} @ {bits}", plan


@TASKS.register("quant_table")
def quant_table(ctx: RunContext) -> dict:
  """Perplexity and KV bytes of every quantization setting on real text."""
  config = ctx.config
  lm = ctx.lm
  text = load_eval_text(config.text, config.text_file)
  tokens = np.asarray(lm.tokenizer.encode(text), np.int32)[:config.context + 1]
  chunk = int(config.quant.get("eval_chunk", 256))
  calibration_tokens = setup.calibration_text_tokens(config.quant, lm)
  rows, base = [], None
  for label, plan in settings(config.quant, lm, calibration_tokens):
    start = time.perf_counter()
    nll, _ = stream_nll(dataclasses.replace(ctx, quant=plan), tokens, chunk)
    ppl = float(np.exp(np.mean(nll)))
    nbytes = kv_bytes(lm.cfg, len(tokens) - 1, plan)
    base = base or (ppl, nbytes)
    rows.append({"setting": label,
                 "avg_bits": 16.0 if plan is None else plan.average_bits(),
                 "ppl": ppl, "ppl_change_pct": 100 * (ppl / base[0] - 1),
                 "kv_bytes": nbytes, "compression": base[1] / nbytes,
                 "plan": "" if plan is None else plan.describe()})
    print(f"{label:28s} ppl {ppl:8.3f} ({rows[-1]['ppl_change_pct']:+.2f}%) "
          f"KV {nbytes / 2**20:6.2f} MiB ({rows[-1]['compression']:.2f}x) "
          f"[{time.perf_counter() - start:.0f}s]", flush=True)
  lines = ["| setting | avg bits | perplexity | Δ vs bf16 | KV MiB | smaller |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['avg_bits']:.2f} | {r['ppl']:.3f} | "
                 f"{r['ppl_change_pct']:+.2f}% | {r['kv_bytes'] / 2**20:.2f} | "
                 f"{r['compression']:.2f}x |")
  print("\n".join(lines))
  return {"tokens": int(len(tokens) - 1), "eval_chunk": chunk, "rows": rows,
          "markdown": "\n".join(lines)}
