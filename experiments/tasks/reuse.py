"""Long-document QA with a prefix store: one document, several questions.

Every question shares the document's KV, so after the first question it is
loaded instead of recomputed. Reports time to first token cold (no store,
the whole prompt prefilled) and warm (document from the store), the tier
each hit came from, and whether the answers (and last prompt logits) equal
the no-store run's. Both runs use the run's cache format: quantized under
``--kv_bits``.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments import setup
from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS
from experiments.texts import load_eval_text
from lmcache_jax import progress
from lmcache_jax.engine.generate import generate
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.reuse import check_reusable, generate_with_store
from lmcache_jax.store import Layout


def task_store(ctx: RunContext):
  """The run's store (these tasks turn it on: ``setup.STORE_TASKS``), built
  for this run's cache layout (quantized or not)."""
  check_reusable(ctx.policy)
  template = ctx.new_cache(1, ctx.config.store.chunk_size)
  store = ctx.store
  if store is None or store.layout != Layout.of(template):
    if store is not None:
      store.close()
    store = ctx.store = setup.make_store(ctx.config, ctx.lm, template)
  return store


def timed_cold(ctx, prompt, capacity, max_new_tokens):
  """Time to first token without a store, and the generation: the whole
  prompt prefilled into the run's cache (quantized as the warm run's is)."""
  first = []
  start = time.perf_counter()
  generation = generate(
      ctx.lm, [prompt], max_new_tokens=max_new_tokens, capacity=capacity,
      prefill_chunk=ctx.config.prefill_chunk, policy=ctx.policy,
      new_cache=ctx.new_cache,
      on_token=lambda step, *_: first.append(time.perf_counter() - start)
      if step == 0 else None)
  return first[0], generation


def precompile(ctx, store, prompt, capacity):
  """A dry run of the warm path (load the stored prefix, prefill the rest),
  so the timed run's time to first token holds no compilation."""
  usable = (len(prompt) - 1) // store.chunk_size * store.chunk_size
  cache, prefix = store.load_into(ctx.new_cache(1, capacity), 0, prompt, usable)
  logits, _ = prefill(ctx.lm, cache, [prompt[prefix.num_tokens:]], ctx.policy,
                      ctx.config.prefill_chunk)
  jax.block_until_ready(logits)


def best_of(repeats, fn):
  """The run with the lowest time of ``repeats`` (the first also compiles)."""
  runs = [fn() for _ in range(repeats)]
  return min(runs, key=lambda r: r[0])


def chat_pieces(tokenizer) -> tuple[str, str, str]:
  """The model's chat template cut around the messages: (what opens the
  conversation, what closes a user message and opens the answer, what closes
  an answer and opens the next user message). Plain "Question"/"Answer"
  cues for a model without a template."""
  if tokenizer.chat_template is None:
    return "", "\nAnswer:", "\n\nQuestion: "
  marks = ("\x01A", "\x01B", "\x01C")
  rendered = tokenizer.apply_chat_template(
      [{"role": "user", "content": marks[0]},
       {"role": "assistant", "content": marks[1]},
       {"role": "user", "content": marks[2]}])
  opening, rest = rendered.split(marks[0])
  user_end, rest = rest.split(marks[1])
  turn, _ = rest.split(marks[2])
  return opening, user_end, turn


def encode(ctx, text, **options):
  """``text``'s ids (``options``: those of ``Tokenizer.encode``)."""
  tokenizer = ctx.lm.tokenizer
  if tokenizer is None:
    raise InputError(f"model {ctx.config.model!r} has no tokenizer; these "
                     f"tasks need one (use a .gguf file or the default model)")
  return tokenizer.encode(text, **options)


@TASKS.register("reuse")
def reuse(ctx: RunContext) -> dict:
  """Document QA: TTFT cold vs warm (document from the store), answers equal."""
  rconf = ctx.config.reuse
  store = task_store(ctx)
  text = load_eval_text(ctx.config.text, ctx.config.text_file)
  # The text and questions are plain text; the chat's pieces hold its
  # control tokens, and the opening the BOS the model asks for.
  document = encode(ctx, text, add_bos=False, special=False)[:rconf.doc_tokens]
  if len(document) < rconf.doc_tokens:
    raise InputError(f"the text holds {len(document)} tokens, fewer than "
                     f"reuse.doc_tokens={rconf.doc_tokens}")
  # One user message: the document (the shared prefix), then the question.
  opening, user_end, _ = chat_pieces(ctx.lm.tokenizer)
  document = encode(ctx, opening) + document
  questions = [encode(ctx, f"\n\nAnswer in one sentence: {q}", add_bos=False,
                      special=False) + encode(ctx, user_end, add_bos=False)
               for q in rconf.questions]
  capacity = (len(document) + max(len(q) for q in questions)
              + rconf.max_new_tokens)
  rows = []
  # per question: cold runs, then (the first) filling the store, warm runs
  for i, question in enumerate(progress.bar(questions, desc="reuse",
                                            unit="question")):
    prompt = document + question
    cold_s, cold = best_of(rconf.repeats, lambda: timed_cold(
        ctx, prompt, capacity, rconf.max_new_tokens))
    if i == 0:  # The first question fills the store with the document.
      generate_with_store(ctx.lm, [prompt], store,
                          max_new_tokens=rconf.max_new_tokens,
                          capacity=capacity, policy=ctx.policy,
                          prefill_chunk=ctx.config.prefill_chunk,
                          new_cache=ctx.new_cache, store_generated=False)
      store.flush()
    precompile(ctx, store, prompt, capacity)
    runs = []
    for _ in range(rconf.repeats):
      warm = generate_with_store(ctx.lm, [prompt], store,
                                 max_new_tokens=rconf.max_new_tokens,
                                 capacity=capacity, policy=ctx.policy,
                                 prefill_chunk=ctx.config.prefill_chunk,
                                 new_cache=ctx.new_cache, store_generated=False)
      runs.append(warm)
    warm = min(runs, key=lambda r: r.ttft_s)
    rows.append(dict(question=rconf.questions[i], ttft_cold_s=cold_s,
                     ttft_warm_s=warm.ttft_s, hit_tokens=warm.hit_tokens[0],
                     hit_tiers=warm.sources[0],
                     answer=ctx.lm.tokenizer.decode(warm.generation.tokens[0],
                                                    skip_special=True),
                     answers_equal=warm.generation.tokens == cold.tokens,
                     max_logit_diff=logit_diff(warm.generation, cold)))
  return summarize(rows, store, prompt_tokens=rconf.doc_tokens)


def logit_diff(warm, cold) -> float:
  """The largest difference between the two runs' last prompt logits."""
  warm_logits, cold_logits = (np.asarray(jax.device_get(g.prompt_logits),
                                         np.float32) for g in (warm, cold))
  return float(np.max(np.abs(warm_logits - cold_logits)))


def summarize(rows: list[dict], store, **extra) -> dict:
  cold = float(np.mean([r["ttft_cold_s"] for r in rows]))
  warm = float(np.mean([r["ttft_warm_s"] for r in rows]))
  return dict(extra, ttft_cold_s=cold, ttft_warm_s=warm,
              speedup=cold / warm,
              answers_equal=all(r["answers_equal"] for r in rows),
              tiers=sorted(tier.name for tier in store.tiers),
              store=store.describe(), turns=rows)
