"""RULER-style tasks on real text, each cell with its accuracy and 95% interval.

  python -m experiments.run --task=ruler --policy=snapkv \
      --config.ruler.compression=0.5
  python -m experiments.run --task=ruler --policy=tova --budget=256 \
      --config.ruler.mode=query_aware --config.ruler.tasks=niah_single_number,vt

A cell is one task at one length: ``prompts`` seeded prompts (the same for
every policy and mode), answered greedily in batches of ``batch_size``, scored
as RULER does (``lmcache_jax.data.ruler``). The two modes of kvpress:
``query_agnostic`` compresses the context before the question is seen (what a
prefix cache holds), ``query_aware`` compresses the context with the
question. Either way the cache is compressed once after prefill, to the
policy's budget (``tasks.retrieval.answer``); the budget is in tokens
(``--budget``) or a share of what is compressed, given as kvpress's
``compression`` ratio (the share dropped: 0.25, 0.5, 0.75, 0.875) or as a
fractional ``--budget`` (the share kept), resolved at each length.
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import ml_collections
import numpy as np

from experiments import setup
from experiments.context import RunContext
from experiments.errors import InputError, input_errors
from experiments.tasks import TASKS
from experiments.tasks.retrieval import answer
from experiments.texts import load_eval_text
from lmcache_jax.cache.policy import CachePolicy
from lmcache_jax.data import ruler as ruler_data
from policies.registry import parse_spec


@TASKS.register("ruler")
def ruler(ctx: RunContext) -> dict:
  """Accuracy per task and length under the run's policy (``config.ruler``)."""
  conf = ctx.config.ruler
  tasks = task_names(conf.tasks)
  check(ctx.config, tasks, ctx.lm.cfg.max_context)
  text = load_eval_text(ctx.config.text, ctx.config.text_file)
  start = time.perf_counter()
  with input_errors():   # a length too short for a task, found before any pass
    prompts = {(task, int(length)): cell_samples(ctx, task, int(length), text)
               for task in tasks for length in conf.lengths}
  cells = [run_cell(ctx, task, length, samples)
           for (task, length), samples in prompts.items()]
  budgets = {c["budget_tokens"] for c in cells}
  per_task = {task: pooled([c for c in cells if c["task"] == task])
              for task in tasks}
  print(table(cells, per_task))
  return {
      # the plain mean over the tasks run, each weighed alike
      "accuracy": float(np.mean([t["accuracy"] for t in per_task.values()])),
      "mode": conf.mode,
      "compression": float(conf.compression),
      # one budget for every cell, or None where the ratio gave each its own
      "budget_tokens": budgets.pop() if len(budgets) == 1 else None,
      "prompts_per_cell": int(conf.prompts),
      "tasks": per_task,
      "cells": cells,
      "seconds": time.perf_counter() - start,
  }


def task_names(tasks) -> list[str]:
  """``tasks`` (a comma string or a sequence of names; ``all``) as a list."""
  names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  names = [n.strip() for n in names if n.strip()]
  if names == ["all"]:
    return list(ruler_data.TASKS)
  unknown = [n for n in names if n not in ruler_data.TASKS]
  if unknown or not names:
    raise InputError(f"--config.ruler.tasks: unknown task(s) {unknown or names}"
                     f"; valid: all, {', '.join(ruler_data.TASKS)}")
  return names


def check(config: ml_collections.ConfigDict, tasks: list[str],
          max_context: int) -> None:
  """Everything about the run's ruler section that needs no prompt."""
  conf = config.ruler
  if conf.mode not in ruler_data.MODES:
    raise InputError(f"--config.ruler.mode must be one of "
                     f"{ruler_data.MODES}, got {conf.mode!r}")
  if conf.prompts < 1 or conf.batch_size < 1:
    raise InputError(f"--config.ruler.prompts and batch_size must be >= 1, "
                     f"got {conf.prompts} and {conf.batch_size}")
  if conf.max_new_tokens < 0:
    raise InputError(f"--config.ruler.max_new_tokens must be >= 0 (0 = "
                     f"RULER's per task), got {conf.max_new_tokens}")
  if not 0 <= conf.compression < 1:
    raise InputError(f"--config.ruler.compression is the share of the "
                     f"context dropped, in [0, 1), got {conf.compression}")
  budget_config(config)
  if not conf.lengths:
    raise InputError("--config.ruler.lengths: give at least one length")
  longest = max(int(n) for n in conf.lengths) + max(
      max_new_tokens(conf, task) for task in tasks)
  if longest > max_context:
    raise InputError(f"--config.ruler.lengths: {longest} tokens with the "
                     f"answer is more than the model has positions for "
                     f"({max_context})")


def max_new_tokens(conf: ml_collections.ConfigDict, task: str) -> int:
  """``conf.max_new_tokens``, or RULER's tokens for ``task`` where it is 0."""
  return int(conf.max_new_tokens) or ruler_data.MAX_NEW_TOKENS[task]


def prompt_seed(run_seed: int, task: str, length: int, index: int) -> int:
  """The seed of a cell's ``index``-th prompt: the same for every policy and
  mode, different for every task, length and run seed."""
  state = np.random.SeedSequence(
      [run_seed, zlib.crc32(task.encode()), length, index])
  return int(state.generate_state(1)[0])


def budget_config(config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """The policy config whose budget each cell resolves: the run's, or with
  ``1 - compression`` (the share kept) as its budget."""
  policy_config = config.policy
  ratio = float(config.ruler.compression)
  if not ratio:
    return policy_config
  if not setup.takes_budget(policy_config.name):
    raise InputError(f"--config.ruler.compression={ratio:g} needs a policy "
                     f"with a budget; {policy_config.name!r} keeps every "
                     f"token")
  if policy_config.budget or "budget" in parse_spec(policy_config.name)[1]:
    raise InputError(f"two budgets: --config.ruler.compression={ratio:g} "
                     f"and --budget or the policy's budget=; give one")
  return ml_collections.ConfigDict({"name": policy_config.name,
                                    "budget": 1.0 - ratio})


def cell_policy(ctx: RunContext, compressed_tokens: int) -> CachePolicy:
  """The run's policy with its budget resolved against the tokens a cell
  compresses: ``compression`` (the share dropped) or a fractional budget is
  a share of them."""
  policy = setup.make_policy(budget_config(ctx.config), compressed_tokens)
  return policy.bind(ctx.lm.cfg)


def cell_samples(ctx: RunContext, task: str, length: int,
                 text: str) -> list[ruler_data.RulerSample]:
  """The seeded prompts of one task at one length."""
  return [ruler_data.generate(task, ctx.lm.tokenizer, text, length,
                              prompt_seed(ctx.config.seed, task, length, i))
          for i in range(ctx.config.ruler.prompts)]


def run_cell(ctx: RunContext, task: str, length: int,
             samples: list[ruler_data.RulerSample]) -> dict:
  """One task at one length: its prompts answered and scored."""
  conf = ctx.config.ruler
  splits = [s.split(conf.mode) for s in samples]
  policy = cell_policy(ctx, max(len(s.prompt) for s in splits))
  compressing = dataclasses.replace(ctx, policy=policy)
  predictions = []
  for first in range(0, len(splits), conf.batch_size):
    texts, _, _ = answer(compressing, splits[first:first + conf.batch_size],
                         max_new_tokens=max_new_tokens(conf, task),
                         chunk=conf.chunk, mode="prefill")
    predictions += texts
  figures = ruler_data.cell(predictions, [s.answers for s in samples])
  return {"task": task, "length": length,
          "budget_tokens": getattr(policy, "budget", None), **figures,
          "samples": [{"answers": list(s.answers), "output": p}
                      for s, p in zip(samples, predictions)]}


def pooled(cells: list[dict]) -> dict:
  """A task's figures over all its lengths (each prompt counted once)."""
  solved = sum(c["solved"] for c in cells)
  prompts = sum(c["prompts"] for c in cells)
  low, high = ruler_data.wilson_interval(solved, prompts)
  score = sum(c["score"] * c["prompts"] for c in cells) / prompts
  return {"accuracy": solved / prompts, "low": low, "high": high,
          "score": score, "solved": solved, "prompts": prompts}


def table(cells: list[dict], per_task: dict[str, dict]) -> str:
  """Accuracy [95% interval] per task (rows) and length (columns)."""
  lengths = sorted({c["length"] for c in cells})

  def show(c: dict) -> str:
    return f"{c['accuracy']:.0%} [{c['low']:.0%}, {c['high']:.0%}]"

  head = f"{'task':20s}" + "".join(f"{n:>17d}" for n in lengths) + (
      f"{'all lengths':>17s}")
  rows = [head]
  for task, figures in per_task.items():
    by_length = {c["length"]: c for c in cells if c["task"] == task}
    rows.append(f"{task:20s}" + "".join(f"{show(by_length[n]):>17s}"
                                        for n in lengths)
                + f"{show(figures):>17s}")
  return "\n".join(rows)
