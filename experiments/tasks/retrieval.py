"""Shared by the retrieval tasks: answer a batch of prompts through the cache.

Two modes. ``prefill`` (the papers' setting): the cache is large enough for the
prompt, so the policy sees the whole prompt and compresses it once to its
budget after prefill (SnapKV-style); the live tokens are then copied into a
cache of the capacity the policy asks for the rest (its budget, the cue in one
pass, the answer: ``cache.compact``) and the whole-prompt cache is dropped, so
the answer runs on, and ``kv_bytes`` reports, what stays allocated after the
compression (``kv_bytes_prefill``: the whole-prompt cache, the peak).
``stream``: the prompt streams through a
cache of budget + chunk slots, evicting after every chunk (StreamingLLM-style).
Either way the answer cue is fed after the compression, as the first tokens of
the answer: it and the decoded tokens are handled by the policy's decode-time
eviction (``decode_mode``: never, every step, every N steps), which the
results state as ``decode_eviction``. Every answer token is predicted from the
compressed cache. A cache that holds a whole prompt is rounded up to a bucket
(``engine.buckets``), so prompts of many lengths share compiled programs.
"""

from __future__ import annotations

import time

import numpy as np

from experiments.context import RunContext
from experiments.errors import InputError
from lmcache_jax.cache.compact import compact, compactable
from lmcache_jax.data.passkey import Sample, first_answer
from lmcache_jax.engine import buckets
from lmcache_jax.engine.generate import decode
from lmcache_jax.engine.prefill import prefill

MODES = ("prefill", "stream")


def answer(ctx: RunContext, samples: list[Sample], *, max_new_tokens: int,
           chunk: int, mode: str) -> tuple[list[str], object, int]:
  """Greedy answers (text) to ``samples`` in one batch, the final cache, and
  the payload bytes of the cache the prompt was prefilled into (in
  ``prefill`` mode the whole prompt's, larger than the final cache)."""
  if mode not in MODES:
    raise InputError(f"retrieval mode must be one of {MODES}, got {mode!r}")
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  lm = ctx.lm
  total = max(s.num_tokens for s in samples) + max_new_tokens
  answer_tokens = max(len(s.cue) for s in samples) + max_new_tokens
  capacity = buckets.cache_capacity(ctx.policy, total, chunk, answer_tokens)
  cache = ctx.new_cache(len(samples), buckets.bucket(total)
                        if mode == "prefill" else capacity)
  prefill_bytes = cache.payload_nbytes
  _, cache = prefill(lm, cache, [s.prompt for s in samples], ctx.policy, chunk)
  if mode == "prefill" and compactable(cache):
    # what the policy needs from here on: its budget, the cue in one pass and
    # the answer; the whole-prompt cache is dropped (a payload on grids over
    # groups of slots, KIVI's keys, cannot be compacted and stays as it is)
    cue_pass = min(chunk, max(len(s.cue) for s in samples))
    cache = compact(cache, buckets.cache_capacity(ctx.policy, total, cue_pass,
                                                  answer_tokens))
  answering = ctx.policy.decoding()
  logits, cache = prefill(lm, cache, [s.cue for s in samples], answering,
                          chunk)
  out = decode(lm, cache, logits, max_new_tokens=max_new_tokens,
               policy=answering, stop_tokens=())
  texts = [lm.tokenizer.decode(t, skip_special=True) for t in out.tokens]
  return texts, out.cache, prefill_bytes


def evaluate(ctx: RunContext, make_sample, conf) -> dict:
  """Accuracy over ``conf.lengths`` x ``conf.depths`` x ``conf.trials``.

  ``make_sample(length, depth, seed)`` builds one prompt; seeds derive from
  the run's seed, so every policy is asked the same questions.
  """
  if ctx.lm.tokenizer is None:
    raise InputError("retrieval tasks need a tokenizer; use the default model "
                     "or a .gguf file")
  if conf.trials < 1:
    raise InputError(f"trials must be >= 1, got {conf.trials}")
  if not conf.lengths or not conf.depths:
    raise InputError("give at least one length and one depth")
  start = time.perf_counter()
  records, cache, prefill_bytes = [], None, 0
  for length in conf.lengths:
    batch = [(depth, trial) for depth in conf.depths
             for trial in range(conf.trials)]
    samples = [make_sample(int(length), float(depth),
                           ctx.config.seed * 100_003 + 1_009 * trial + i)
               for i, (depth, trial) in enumerate(batch)]
    texts, cache, length_bytes = answer(
        ctx, samples, max_new_tokens=conf.max_new_tokens, chunk=conf.chunk,
        mode=conf.mode)
    prefill_bytes = max(prefill_bytes, length_bytes)
    for (depth, trial), sample, text in zip(batch, samples, texts):
      records.append({"length": int(length), "depth": float(depth),
                      "trial": trial, "answer": sample.answer, "output": text,
                      "correct": first_answer(text, sample.answer)})
  seconds = time.perf_counter() - start
  correct = np.array([r["correct"] for r in records], float)
  results = {
      "accuracy": float(correct.mean()),
      "trials": len(records),
      "mode": conf.mode,
      "decode_eviction": ctx.policy.decode_mode,
      "kv_bytes": cache.payload_nbytes,
      "kv_bytes_prefill": prefill_bytes,
      "cache_capacity": cache.capacity,
      "live_slots_max": int(np.asarray(cache.live_slots()).max()),
      "seconds": seconds,
      "samples": records,
  }
  for depth in conf.depths:
    hits = [r["correct"] for r in records if r["depth"] == float(depth)]
    results[f"acc_depth_{float(depth):g}"] = float(np.mean(hits))
  if len(conf.lengths) > 1:
    for length in conf.lengths:
      hits = [r["correct"] for r in records if r["length"] == int(length)]
      results[f"acc_len_{int(length)}"] = float(np.mean(hits))
  return results
