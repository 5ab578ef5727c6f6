"""The quantization tables of docs/quantization.md: perplexity and KV bytes.

  python -m experiments.run --task=quant_table                  # policies
  python -m experiments.run --task=quant_table --config.quant.table=storage

``policies`` (the default): every calibration policy of
``quant.table_policies`` (uniform, variance, sensitivity, kvquant, kivi) at
each of ``quant.table_bits`` (2, 3, 4) average bits, each plan built as
``--kv_bits=B --calibration=NAME`` builds it (the run's storage: rotated,
keys centered, 4 exact sinks and the 32-token window as int8 copies; a
policy with knobs of its own, such as kivi, keeps them), against bf16 on
``context`` tokens of every text of ``quant.table_texts`` (Hamlet and
Othello). Calibration reads ``calibration_tokens`` of ``calibration_text``
(Macbeth), so every evaluated text is held out. A policy that is not
registered is an error before the model loads (``setup.table_policies``).

``storage``: the storage ablation on ``text``: bf16, fp8, and uniform
int8/int4/int3/int2 each stored plainly, Hadamard-rotated with keys
centered, with 4 exact sink tokens too, and with an exact window of the 64
most recent tokens too (below int8: also a 32-token window held as int8
copies, the default of ``--kv_bits``).

Tokens go through a full cache ``quant.eval_chunk`` at a time (a speed knob
only: a quantized prefill reads the cache as decoding does). KV bytes are
the payload a bfloat16-storage cache of that plan allocates for ``context``
tokens (codes, scales, zeros, exact copies and maps), whatever
the compute dtype of the run.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.context import RunContext
from experiments.errors import InputError
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


def _names(value) -> list[str]:
  """A comma string (or a sequence) of names."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


def storage_settings(qconf, lm, calibration_tokens):
  """(label, plan) rows of the storage ablation."""
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


def policy_plans(qconf, policies, lm, calibration_tokens):
  """(policy, bits, plan) rows: each of ``policies`` at each bits."""
  knobs = {k: qconf.get(k) for k in ("group_size", "residual", "sinks",
                                     "copy_bits", "rotate", "center_keys")
           if qconf.get(k) is not None}
  for name in policies:
    for bits in (float(b) for b in _names(qconf.get("table_bits", "2,3,4"))):
      start = time.perf_counter()
      plan = setup.quant_plan({**knobs, "kv_bits": bits, "calibration": name},
                              lm, calibration_tokens)
      print(f"  calibrated {name} @ {bits:g} bits in "
            f"{time.perf_counter() - start:.0f}s", flush=True)
      yield name, bits, plan


def _perplexity(ctx, plan, tokens, chunk) -> float:
  nll, _ = stream_nll(dataclasses.replace(ctx, quant=plan), tokens, chunk)
  return float(np.exp(np.mean(nll)))


def policy_table(ctx: RunContext) -> dict:
  """Every calibration policy at each budget on every text, vs bf16."""
  config, lm = ctx.config, ctx.lm
  policies = setup.table_policies(config.quant)   # before any long work
  texts = _names(config.quant.get("table_texts", "hamlet,othello"))
  chunk = int(config.quant.get("eval_chunk", 256))
  context = int(config.context)
  tokens = {}
  for text in texts:
    ids = np.asarray(lm.tokenizer.encode(load_eval_text(text)), np.int32)
    if len(ids) < context + 1:
      raise InputError(f"text {text!r} has {len(ids)} tokens, fewer than "
                       f"--context={context} + 1")
    tokens[text] = ids[:context + 1]
  calibration_tokens = setup.calibration_text_tokens(config.quant, lm)
  began = time.perf_counter()
  base = {t: _perplexity(ctx, None, tokens[t], chunk) for t in texts}
  dense = kv_bytes(lm.cfg, context, None)
  rows = [{"policy": "bf16", "bits": 16.0, "avg_bits": 16.0,
           "ppl": dict(base), "change_pct": {t: 0.0 for t in texts},
           "kv_bytes": dense, "compression": 1.0, "plan": ""}]
  print(f"bf16 {base}", flush=True)
  for name, bits, plan in policy_plans(config.quant, policies, lm,
                                       calibration_tokens):
    start = time.perf_counter()
    ppl = {t: _perplexity(ctx, plan, tokens[t], chunk) for t in texts}
    nbytes = kv_bytes(lm.cfg, context, plan)
    rows.append({"policy": name, "bits": bits,
                 "avg_bits": plan.average_bits(), "ppl": ppl,
                 "change_pct": {t: 100 * (ppl[t] / base[t] - 1)
                                for t in texts},
                 "kv_bytes": nbytes, "compression": dense / nbytes,
                 "plan": plan.describe()})
    print(f"{name} @ {bits:g}: " + " ".join(
        f"{t} {ppl[t]:.3f} ({rows[-1]['change_pct'][t]:+.2f}%)"
        for t in texts)
          + f" KV {nbytes / 2**20:.2f} MiB [{time.perf_counter() - start:.0f}s]",
          flush=True)
  seconds = time.perf_counter() - began
  head = ("| policy | bits | " + " | ".join(
      f"{t} ppl | {t} Δ" for t in texts) + " | KV MiB | smaller |")
  lines = [head, "|---" * (4 + 2 * len(texts)) + "|"]
  for r in rows:
    lines.append(f"| {r['policy']} | {r['avg_bits']:.2f} | " + " | ".join(
        f"{r['ppl'][t]:.3f} | {r['change_pct'][t]:+.2f}%" for t in texts)
        + f" | {r['kv_bytes'] / 2**20:.2f} | {r['compression']:.2f}x |")
  markdown = "\n".join(lines)
  print(markdown)
  print(f"{len(texts)} texts x {context} tokens, {len(rows)} rows in "
        f"{seconds / 60:.1f} min")
  return {"table": "policies", "tokens": context, "texts": texts,
          "eval_chunk": chunk, "rows": rows, "seconds": seconds,
          "markdown": markdown}


def storage_table(ctx: RunContext) -> dict:
  """Perplexity and KV bytes of every storage setting on ``text``."""
  config = ctx.config
  lm = ctx.lm
  text = load_eval_text(config.text, config.text_file)
  tokens = np.asarray(lm.tokenizer.encode(text), np.int32)[:config.context + 1]
  chunk = int(config.quant.get("eval_chunk", 256))
  calibration_tokens = setup.calibration_text_tokens(config.quant, lm)
  rows, base = [], None
  for label, plan in storage_settings(config.quant, lm, calibration_tokens):
    start = time.perf_counter()
    ppl = _perplexity(ctx, plan, tokens, chunk)
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
  return {"table": "storage", "tokens": int(len(tokens) - 1),
          "eval_chunk": chunk, "rows": rows, "markdown": "\n".join(lines)}


TABLES = {"policies": policy_table, "storage": storage_table}


@TASKS.register("quant_table")
def quant_table(ctx: RunContext) -> dict:
  """Perplexity and KV bytes of quantization settings on real text."""
  which = str(ctx.config.quant.get("table", "policies"))
  if which not in TABLES:
    raise InputError(f"config.quant.table={which!r}: use one of "
                     f"{', '.join(TABLES)}")
  return TABLES[which](ctx)
