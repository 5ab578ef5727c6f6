"""Passkey retrieval accuracy, over seeded trials at several depths and lengths.

  python -m experiments.run --task=passkey --policy=snapkv --budget=128
  python -m experiments.run --task=passkey --config.passkey.mode=stream

See ``lmcache_jax.data.passkey`` for the prompt and ``tasks.retrieval`` for
the two modes (compress after prefill, or stream).
"""

from __future__ import annotations

import functools

from experiments.context import RunContext
from experiments.tasks import TASKS
from experiments.tasks.retrieval import evaluate
from lmcache_jax.data import passkey as passkey_data


@TASKS.register("passkey")
def passkey(ctx: RunContext) -> dict:
  """Accuracy of recalling a number hidden in filler (``config.passkey``)."""
  conf = ctx.config.passkey
  make = functools.partial(passkey_data.passkey, ctx.lm.tokenizer,
                           digits=conf.digits)
  return evaluate(ctx, lambda length, depth, seed: make(length, depth,
                                                        seed=seed), conf)
