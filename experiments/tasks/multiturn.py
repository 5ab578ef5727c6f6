"""A conversation of several turns with a prefix store.

Each turn's prompt is the whole conversation so far; the store holds the
previous turns' KV (prompts and answers), so only the new user message is
prefilled. Reports per turn time to first token cold (no store) vs warm,
tokens loaded and their tier, and whether the answers (and last prompt
logits) equal the no-store run's, both in the run's cache format.
Pieces (cut from the model's chat template) are tokenized separately and
concatenated, so turn n+1's prompt starts with exactly the tokens of turn n
and its answer (less the stop token that ended it: the next turn's piece
closes the answer as the template does).
"""

from __future__ import annotations

from experiments.context import RunContext
from experiments.tasks import TASKS
from experiments.tasks.reuse import (best_of, chat_pieces, encode, logit_diff,
                                     precompile, summarize, task_store,
                                     timed_cold)
from experiments.texts import load_eval_text
from lmcache_jax import progress
from lmcache_jax.engine.reuse import generate_with_store


def next_prompt(ctx: RunContext, history: list[int], turn: int,
                message: str) -> list[int]:
  """``history`` (the conversation so far: the chat's opening and passage,
  then every turn and answer) followed by user message ``turn``, ready for
  the answer. The first message continues the user message that holds the
  passage; a later one opens a new user turn with the template's piece."""
  _, user_end, turn_end = chat_pieces(ctx.lm.tokenizer)
  opens = ([] if turn == 0 else encode(ctx, turn_end, add_bos=False))
  plain = ("\n\n" if turn == 0 else "") + message
  return (history + opens + encode(ctx, plain, add_bos=False, special=False)
          + encode(ctx, user_end, add_bos=False))


def after_answer(prompt: list[int], answer: list[int],
                 finished: bool) -> list[int]:
  """The conversation once ``prompt`` is answered: the prompt and the
  answer's tokens, less the stop token of an answer that ``finished`` on one
  — the next turn's piece opens with the template's end-of-turn token, so
  keeping it would double it (``<|im_end|><|im_end|>``). An answer cut by
  the token limit is kept whole (its last token has no KV yet)."""
  return prompt + (answer[:-1] if finished else answer)


@TASKS.register("multiturn")
def multiturn(ctx: RunContext) -> dict:
  """Chat turns: TTFT cold vs warm (previous turns from the store), answers equal."""
  mconf = ctx.config.multiturn
  store = task_store(ctx)
  text = load_eval_text(ctx.config.text, ctx.config.text_file)
  # The passage opens the first user message; each answer closes its turn.
  opening, _, _ = chat_pieces(ctx.lm.tokenizer)
  history = encode(ctx, opening) + encode(
      ctx, text, add_bos=False, special=False)[:mconf.context_tokens]
  capacity = (len(history) + len(mconf.messages) * mconf.max_new_tokens
              + sum(len(next_prompt(ctx, [], i, m))
                    for i, m in enumerate(mconf.messages)))
  rows = []
  for i, message in enumerate(progress.bar(mconf.messages, desc="multiturn",
                                           unit="turn")):
    prompt = next_prompt(ctx, history, i, message)
    cold_s, cold = best_of(mconf.repeats, lambda: timed_cold(
        ctx, prompt, capacity, mconf.max_new_tokens))
    precompile(ctx, store, prompt, capacity)
    warm = generate_with_store(ctx.lm, [prompt], store,
                               max_new_tokens=mconf.max_new_tokens,
                               capacity=capacity, policy=ctx.policy,
                               prefill_chunk=ctx.config.prefill_chunk,
                               new_cache=ctx.new_cache)
    store.flush()
    answer = warm.generation.tokens[0]
    rows.append(dict(turn=i, prompt_tokens=len(prompt),
                     ttft_cold_s=cold_s, ttft_warm_s=warm.ttft_s,
                     hit_tokens=warm.hit_tokens[0], hit_tiers=warm.sources[0],
                     answer=ctx.lm.tokenizer.decode(answer, skip_special=True),
                     answers_equal=warm.generation.tokens == cold.tokens,
                     max_logit_diff=logit_diff(warm.generation, cold)))
    history = after_answer(prompt, answer, warm.generation.finished[0])
  # Turn 0 has nothing to reuse: the averages cover the later turns.
  summary = summarize(rows[1:] or rows, store, turns_total=len(rows))
  summary["turns"] = rows
  return summary
