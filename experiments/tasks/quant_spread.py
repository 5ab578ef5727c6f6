"""The 4-bit target across texts: how much int4 costs in perplexity on
several windows of real text, with the mean and spread.

  python -m experiments.run --task=quant_spread
  python -m experiments.run --task=quant_spread \
      --config.quant.spread_settings=32:8     # one setting

One text is one draw of rounding noise: at this model size int4 settings
that differ by less than about 1% on one text cannot be told apart
(docs/quantization.md). This task streams ``context`` tokens of each window
(``play@offset``, token offset into a Shakespeare work; default
``WINDOWS``) through a full cache in bf16 and
in int4 (rotated, keys centered, 4 exact sinks) with the exact recent
windows of ``SETTINGS`` (tokens, and the copies' bits: 16 = bf16, 8 = int8
codes; ``quant.spread_settings`` picks others), and reports every window's
change, the mean and the sample standard deviation, and the KV bytes of
each setting. ``quant.eval_chunk`` tokens go through each forward pass; a
quantized prefill reads the cache as decoding does, so it changes only the
speed.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS
from experiments.tasks.perplexity import stream_nll
from experiments.tasks.quant_table import kv_bytes
from experiments import setup
from lmcache_jax.data import shakespeare
from lmcache_jax.engine import calibration
from lmcache_jax.quant.plan import QuantPlan

WINDOWS = ("hamlet@0", "hamlet@2048", "othello@0", "lear@0", "tempest@0",
           "twelfth_night@0")
SETTINGS = ((0, 16), (16, 8), (32, 16), (32, 8), (64, 8))


def window_tokens(tokenizer, spec: str, length: int) -> np.ndarray:
  """``length`` + 1 token ids of ``play@offset``, as a sequence starts: BOS
  first when the model asks for it."""
  play, _, offset = spec.partition("@")
  if not offset.isdigit():
    raise InputError(f"window {spec!r} must be play@offset (a token offset), "
                     f"e.g. hamlet@2048")
  start = int(offset)
  tokens = tokenizer.encode(shakespeare.load_text(play), add_bos=False)
  if start + length + 1 > len(tokens):
    raise InputError(f"window {spec!r} needs {start + length + 1} tokens; "
                     f"{play} has {len(tokens)}")
  bos = tokenizer.encode("")
  return np.asarray(bos + tokens[start:start + length + 1 - len(bos)],
                    np.int32)


def parse_settings(text: str) -> tuple[tuple[int, int], ...]:
  """``"32:8,64:16"`` → ((32, 8), (64, 16)): recent window and copy bits."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    window, _, bits = item.partition(":")
    if not (window.isdigit() and bits in ("8", "16")):
      raise InputError(f"quant.spread_settings item {item!r} must be "
                       f"WINDOW:COPY_BITS with COPY_BITS 8 or 16, e.g. 32:8")
    out.append((int(window), int(bits)))
  return tuple(out)


def setting_label(residual: int, copy_bits: int) -> str:
  copies = " (int8 copies)" if copy_bits == 8 else ""
  return f"int4 rot. + cent. + 4 sinks + residual {residual}{copies}"


def summary(changes: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one window) of changes."""
  values = np.asarray(changes, np.float64)
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), spread


@TASKS.register("quant_spread")
def quant_spread(ctx: RunContext, windows=WINDOWS, settings=None) -> dict:
  """Per-window perplexity change of int4 settings vs bf16, mean and spread."""
  config, lm = ctx.config, ctx.lm
  settings = (settings or parse_settings(config.quant.get("spread_settings", ""))
              or SETTINGS)
  length = int(config.context)
  chunk = int(config.quant.get("eval_chunk", 256))
  group = int(config.quant.get("group_size", 64))
  key_shift = calibration.key_means(calibration.collect(
      lm, setup.calibration_text_tokens(config.quant, lm)))
  plans = {setting_label(r, bits): QuantPlan.uniform(
      lm.cfg, "int4", group_size=group, sinks=4, residual=r, rotate=True,
      key_shift=key_shift, copy_bits=bits) for r, bits in settings}
  changes = {label: [] for label in plans}
  for spec in windows:
    tokens = window_tokens(lm.tokenizer, spec, length)
    nll, _ = stream_nll(ctx, tokens, 256)   # dense: any chunking is exact
    base = float(np.exp(np.mean(nll)))
    for label, plan in plans.items():
      start = time.perf_counter()
      nll, _ = stream_nll(dataclasses.replace(ctx, quant=plan), tokens, chunk)
      changes[label].append(100 * (float(np.exp(np.mean(nll))) / base - 1))
      print(f"{spec:18s} {label:42s} {changes[label][-1]:+.2f}% "
            f"[{time.perf_counter() - start:.0f}s]", flush=True)
  dense = kv_bytes(lm.cfg, length, None)
  rows = []
  for label, plan in plans.items():
    mean, spread = summary(changes[label])
    nbytes = kv_bytes(lm.cfg, length, plan)
    rows.append({"setting": label, "changes_pct": changes[label],
                 "mean_pct": mean, "sd_pct": spread, "kv_bytes": nbytes,
                 "compression": dense / nbytes})
  lines = ["| setting | " + " | ".join(windows) + " | mean | sd | smaller |",
           "|---" * (len(windows) + 4) + "|"]
  for r in rows:
    lines.append(f"| {r['setting']} | "
                 + " | ".join(f"{c:+.2f}%" for c in r["changes_pct"])
                 + f" | {r['mean_pct']:+.2f}% | {r['sd_pct']:.2f} | "
                 f"{r['compression']:.2f}x |")
  print("\n".join(lines))
  return {"tokens": length, "eval_chunk": chunk, "windows": list(windows),
          "rows": rows, "markdown": "\n".join(lines)}
