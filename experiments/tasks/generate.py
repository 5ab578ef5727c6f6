"""Generation from a prompt, streamed to the terminal as it is produced."""

from __future__ import annotations

import sys
import time

import jax

from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS
from lmcache_jax import defaults
from lmcache_jax.engine import Sampling, generate as generate_tokens


def prompt_ids(gconf, tokenizer) -> list[int]:
  """Token ids of ``gconf.prompt``, in the chat template when ``gconf.chat``
  and the model has one."""
  if not gconf.prompt.strip():
    raise InputError("--prompt is empty: give the model something to respond to")
  if gconf.chat and tokenizer.chat_template:
    return tokenizer.encode_chat([{"role": "user", "content": gconf.prompt}])
  return tokenizer.encode(gconf.prompt)


@TASKS.register("generate")
def generate(ctx: RunContext) -> dict:
  """Greedy or sampled continuation of ``config.generate.prompt``.

  ``tokens_per_second`` counts the tokens after the second, whose step
  compiles the decode loop, so it holds no compilation; ``ttft_s`` does.
  """
  gconf = ctx.config.generate
  tokenizer = ctx.lm.tokenizer
  ids = prompt_ids(gconf, tokenizer)
  sampling = Sampling(gconf.temperature, gconf.top_k, gconf.top_p)
  streamed: list[int] = []
  arrived: list[float] = []

  def show(step, tokens, active):
    del step
    arrived.append(time.perf_counter())
    if active[0]:
      before = tokenizer.decode(streamed, skip_special=True)
      streamed.append(int(tokens[0]))
      sys.stdout.write(tokenizer.decode(streamed, skip_special=True)[len(before):])
      sys.stdout.flush()

  start = time.perf_counter()
  result = generate_tokens(
      ctx.lm, [ids], max_new_tokens=gconf.max_new_tokens, sampling=sampling,
      key=jax.random.key(ctx.config.seed), policy=ctx.policy,
      prefill_chunk=defaults.working_chunk(ctx.policy, ctx.config.prefill_chunk),
      on_token=show, new_cache=ctx.new_cache)
  seconds = time.perf_counter() - start
  sys.stdout.write("\n")
  new = result.tokens[0]
  steady = len(arrived) - 2
  return {
      "prompt": gconf.prompt,
      "answer": tokenizer.decode(new, skip_special=True),
      "prompt_tokens": len(ids),
      "tokens": len(new),
      "stopped_on_eos": result.finished[0],
      "kv_bytes": result.cache.payload_nbytes,
      "cache_bytes": result.cache.nbytes,
      "cache_capacity": result.cache.capacity,
      "ttft_s": arrived[0] - start if arrived else None,
      "seconds": seconds,
      "tokens_per_second": (steady / (arrived[-1] - arrived[1])
                            if steady > 0 else None),
  }
