"""Perplexity of a real text, streamed through the policy's cache.

With an evicting policy the whole text streams through a cache smaller than
the text (StreamingLLM's evaluation). With ``full``, texts longer than the
context are scored in overlapping windows of ``context`` tokens (stride half a
window), each token once, with at least half a window of history.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS
from experiments.texts import load_eval_text
from lmcache_jax import defaults, progress
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import steps


def stream_nll(ctx: RunContext, tokens: np.ndarray, chunk: int):
  """NLL of tokens[1:] given the prefix, streaming all tokens through one cache.

  Returns (nll [len(tokens) - 1], cache).
  """
  lm = ctx.lm
  inputs, targets = tokens[:-1], tokens[1:]
  n = len(inputs)
  cache = ctx.new_cache(1, ctx.capacity_for(n, chunk))
  nll = []
  # A bar only where it helps: a terminal and more than a few passes.
  for start in progress.bar(range(0, n, chunk), desc="perplexity",
                            unit="pass", disable=None if n > 8 * chunk else True):
    piece = inputs[start:start + chunk]
    real = len(piece)
    padded = np.zeros(chunk, np.int32)
    padded[:real] = piece
    padded_targets = np.zeros(chunk, np.int32)
    padded_targets[:real] = targets[start:start + real]
    out, cache = steps.forward_nll(
        lm.graphdef, lm.params, cache, jnp.asarray(padded[None]),
        jnp.asarray([real], jnp.int32), jnp.asarray(padded_targets[None]),
        policy=ctx.policy)
    nll.append(np.asarray(out[0, :real]))
  return np.concatenate(nll), cache


def windowed_nll(ctx: RunContext, tokens: np.ndarray, window: int, chunk: int):
  """NLL of tokens[1:] scored in windows of ``window`` tokens, stride window/2."""
  stride = max(window // 2, 1)
  nll = np.full(len(tokens) - 1, np.nan)
  cache = None
  for start in range(0, len(tokens) - 1, stride):
    piece = tokens[start:start + window + 1]
    piece_nll, cache = stream_nll(ctx, piece, chunk)
    fresh = slice(0 if start == 0 else window - stride, len(piece_nll))
    nll[start + fresh.start:start + fresh.stop] = piece_nll[fresh]
    if start + window >= len(tokens) - 1:
      break
  return nll, cache


def bucket_report(nll: np.ndarray, buckets: int) -> list[dict]:
  """Perplexity per contiguous position bucket (StreamingLLM-style curves)."""
  edges = np.linspace(0, len(nll), buckets + 1).astype(int)
  return [{"start": int(a), "end": int(b),
           "ppl": float(np.exp(np.mean(nll[a:b])))}
          for a, b in zip(edges[:-1], edges[1:]) if b > a]


@TASKS.register("perplexity")
def perplexity(ctx: RunContext) -> dict:
  """Perplexity over ``num_tokens`` tokens of the evaluation text."""
  config = ctx.config
  pconf = config.perplexity
  num_tokens = pconf.num_tokens or config.context
  text = load_eval_text(config.text, config.text_file)
  tokens = np.asarray(ctx.lm.tokenizer.encode(text), np.int32)
  if len(tokens) < num_tokens + 1:
    raise InputError(f"the evaluation text holds {len(tokens)} tokens; scoring "
                     f"{num_tokens} needs {num_tokens + 1}: use --context="
                     f"{len(tokens) - 1} or less, or a longer text")
  tokens = tokens[:num_tokens + 1]
  chunk = defaults.working_chunk(ctx.policy, min(pconf.chunk, config.context))
  start = time.perf_counter()
  if isinstance(ctx.policy, KeepAll) and len(tokens) - 1 > config.context:
    nll, cache = windowed_nll(ctx, tokens, config.context, chunk)
  else:
    nll, cache = stream_nll(ctx, tokens, chunk)
  seconds = time.perf_counter() - start
  if not np.all(np.isfinite(nll)):
    raise FloatingPointError("non-finite log-likelihood: the model or cache "
                             "produced NaN/inf")
  return {
      "tokens": int(len(nll)),
      "ppl": float(np.exp(np.mean(nll))),
      "nll": float(np.mean(nll)),
      "ppl_by_position": bucket_report(nll, pconf.buckets),
      "kv_bytes": cache.payload_nbytes,
      "cache_bytes": cache.nbytes,
      "cache_capacity": cache.capacity,
      "seconds": seconds,
      "tokens_per_second": len(nll) / seconds,
  }
