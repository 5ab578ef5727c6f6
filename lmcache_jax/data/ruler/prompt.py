"""A RULER prompt in three parts, and the pieces its generators share.

Every prompt is ``context + question + answer_prefix``, in token ids of the
model's tokenizer. The two modes of kvpress split it differently
(``RulerSample.split``): query-agnostic compresses the context alone and
feeds the question after (what a prefix cache sees); query-aware compresses
the context with the question. The answer prefix (RULER's, for a base model
without a chat template) always comes after the compression, so every answer
token is predicted from the compressed cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lmcache_jax.data.needle import line_start_near
from lmcache_jax.data.passkey import Tokenizer

MODES = ("query_agnostic", "query_aware")


@dataclasses.dataclass(frozen=True)
class Split:
  """What is compressed (``prompt``) and what is fed after it (``cue``), as
  ``tasks.retrieval.answer`` takes a prompt."""
  prompt: list[int]
  cue: list[int]

  @property
  def num_tokens(self) -> int:
    return len(self.prompt) + len(self.cue)


@dataclasses.dataclass(frozen=True)
class RulerSample:
  """One prompt of a task: its three parts, the answers a prediction must
  contain, and where the inserted facts start in ``context`` (token indices;
  empty for the word-extraction tasks, which have no haystack)."""
  task: str
  context: list[int]
  question: list[int]
  answer_prefix: list[int]
  answers: tuple[str, ...]
  fact_starts: tuple[int, ...] = ()

  @property
  def num_tokens(self) -> int:
    return len(self.context) + len(self.question) + len(self.answer_prefix)

  def split(self, mode: str) -> Split:
    """The prompt to compress and the cue after it, in ``mode``."""
    if mode == "query_agnostic":
      return Split(self.context, self.question + self.answer_prefix)
    if mode == "query_aware":
      return Split(self.context + self.question, self.answer_prefix)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def haystack_window(tokenizer: Tokenizer, text: str, tokens: int,
                    rng: np.random.Generator) -> list[int]:
  """At least ``tokens`` ids of ``text`` from a seeded line on, wrapping
  around its end (a short text repeats)."""
  lines = text.splitlines(keepends=True)
  if not lines:
    raise ValueError("the haystack text is empty")
  start, chars = int(rng.integers(len(lines))), 4 * tokens + 64
  window, i = [], start
  while True:
    while sum(map(len, window)) < chars:
      window.append(lines[i % len(lines)])
      i += 1
    ids = tokenizer.encode("".join(window), add_bos=False)
    if len(ids) >= tokens:
      return ids
    chars *= 2   # a tokenizer of long tokens: read more of the text


def fresh(draw: Callable[[], str], text: str, used: set[str]) -> str:
  """A value of ``draw()`` that occurs neither in ``text`` (the haystack's
  source) nor in ``used`` (which it joins), so an answer is found only where
  it was put."""
  for _ in range(1000):
    value = draw()
    if value not in used and value not in text:
      used.add(value)
      return value
  raise ValueError("cannot draw a value absent from the text; the word lists "
                   "are too small for this prompt")


def insert_facts(tokenizer: Tokenizer, head: list[int], haystack: list[int],
                 facts: list[list[int]], room: int, rng: np.random.Generator
                 ) -> tuple[list[int], tuple[int, ...]]:
  """``head`` + the first ``room`` haystack ids with ``facts`` inserted, in
  order, at line starts after seeded uniform depths. Returns the context and
  where each fact starts in it."""
  haystack = haystack[:room]
  depths = np.sort(rng.random(len(facts)))
  cuts = [line_start_near(tokenizer, haystack, int(round(d * room)))
          for d in depths]
  context, starts, last = list(head), [], 0
  for cut, fact in zip(cuts, facts):
    context += haystack[last:cut]
    starts.append(len(context))
    context += fact
    last = cut
  context += haystack[last:]
  return context, tuple(starts)


def fit_haystack(tokenizer: Tokenizer, text: str, length: int,
                 head: str, facts: list[str], question: str,
                 answer_prefix: str, rng: np.random.Generator
                 ) -> tuple[list[int], list[int], list[int], tuple[int, ...]]:
  """Context, question and answer-prefix ids of exactly ``length`` tokens:
  ``head`` (the task's instruction, BOS first where the model asks), then a
  seeded window of ``text`` with each of ``facts`` on a line of its own."""
  head_ids = tokenizer.encode(head)
  fact_ids = [tokenizer.encode(fact + "\n", add_bos=False) for fact in facts]
  question_ids = tokenizer.encode(question, add_bos=False)
  prefix_ids = tokenizer.encode(answer_prefix, add_bos=False)
  fixed = (len(head_ids) + sum(map(len, fact_ids)) + len(question_ids)
           + len(prefix_ids))
  room = length - fixed
  if room < 1:
    raise ValueError(f"a prompt of {length} tokens cannot hold the "
                     f"instruction, facts and question ({fixed} tokens); ask "
                     f"for at least {fixed + 1}")
  haystack = haystack_window(tokenizer, text, room, rng)
  context, starts = insert_facts(tokenizer, head_ids, haystack, fact_ids,
                                 room, rng)
  return context, question_ids, prefix_ids, starts
