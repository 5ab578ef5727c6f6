"""Needle in a haystack: a secret word hidden in real Shakespeare.

  python -m experiments.run --task=needle --policy=h2o --budget=256
  python -m experiments.run --task=needle --text=macbeth --config.needle.depths='(0.5,)'

The haystack is ``--text`` (a Shakespeare work, ``corpus``, or ``--text_file``);
see ``lmcache_jax.data.needle`` and ``tasks.retrieval``.
"""

from __future__ import annotations

from experiments.context import RunContext
from experiments.tasks import TASKS
from experiments.tasks.retrieval import evaluate
from experiments.texts import load_eval_text
from lmcache_jax.data import needle as needle_data


@TASKS.register("needle")
def needle(ctx: RunContext) -> dict:
  """Accuracy of recalling a word hidden in real text (``config.needle``)."""
  text = load_eval_text(ctx.config.text, ctx.config.text_file)
  tokenizer = ctx.lm.tokenizer

  def make(length, depth, seed):
    return needle_data.needle(tokenizer, text, length, depth, seed)

  return evaluate(ctx, make, ctx.config.needle)
