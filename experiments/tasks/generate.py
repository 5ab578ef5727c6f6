"""Generation from a prompt, streamed to the terminal as it is produced."""

from __future__ import annotations

import sys
import time

import jax

from experiments.context import RunContext
from experiments.tasks import TASKS
from lmcache_jax.engine import Sampling, generate as generate_tokens


@TASKS.register("generate")
def generate(ctx: RunContext) -> dict:
  """Greedy or sampled continuation of ``config.generate.prompt``."""
  gconf = ctx.config.generate
  tokenizer = ctx.lm.tokenizer
  if tokenizer is None:
    raise ValueError(f"model {ctx.config.model!r} has no tokenizer; generation "
                     f"needs one (use a .gguf file or the default model)")
  if not gconf.prompt.strip():
    raise ValueError("--prompt is empty: give the model something to respond to")
  prompt = gconf.prompt
  if gconf.chat and tokenizer.chat_template:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  ids = tokenizer.encode(prompt)
  sampling = Sampling(gconf.temperature, gconf.top_k, gconf.top_p)
  streamed: list[int] = []

  def show(step, tokens, active):
    del step
    if active[0]:
      before = tokenizer.decode(streamed, skip_special=True)
      streamed.append(int(tokens[0]))
      sys.stdout.write(tokenizer.decode(streamed, skip_special=True)[len(before):])
      sys.stdout.flush()

  start = time.perf_counter()
  result = generate_tokens(
      ctx.lm, [ids], max_new_tokens=gconf.max_new_tokens, sampling=sampling,
      key=jax.random.key(ctx.config.seed), policy=ctx.policy,
      prefill_chunk=ctx.config.prefill_chunk, on_token=show,
      new_cache=ctx.new_cache)
  seconds = time.perf_counter() - start
  sys.stdout.write("\n")
  new = result.tokens[0]
  return {
      "prompt": gconf.prompt,
      "text": tokenizer.decode(new, skip_special=True),
      "prompt_tokens": len(ids),
      "tokens": len(new),
      "stopped_on_eos": result.finished[0],
      "kv_bytes": result.cache.payload_nbytes,
      "cache_bytes": result.cache.nbytes,
      "seconds": seconds,
      "tokens_per_second": len(new) / seconds,
  }
