"""RULER's needle-in-a-haystack family, on real text.

A needle is the line ``One of the special magic numbers for KEY is: VALUE.``
(``words``, ``uuids`` for those kinds of value); keys are ``adjective-noun``
words, values 7-digit numbers, words or UUIDs, all seeded. The haystack is a
seeded window of the text, the needles at uniform random depths (on line
starts). As in RULER:

* single: one key, one value;
* multi-key: four keys, one asked for (the others distract);
* multi-value: one key with four values, all asked for;
* multi-query: four keys, all asked for.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from lmcache_jax.data.passkey import Tokenizer
from lmcache_jax.data.ruler import words
from lmcache_jax.data.ruler.prompt import RulerSample, fit_haystack, fresh

INSTRUCTION = ("Some special magic {kind} are hidden within the following "
               "text. Make sure to memorize it. I will quiz you about the "
               "{kind} afterwards.\n")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
QUESTION = ("\nWhat are all the special magic {kind} for {query} mentioned "
            "in the provided text?")
ANSWER_PREFIX = (" The special magic {kind} for {query} mentioned in the "
                 "provided text are")
KINDS = ("numbers", "words", "uuids")


@dataclasses.dataclass(frozen=True)
class Needles:
  """How many keys are hidden, values each key has, and keys asked for."""
  kind: str
  keys: int = 1
  values: int = 1
  queries: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"needle kind must be one of {KINDS}, got {self.kind!r}")
    if not 1 <= self.queries <= self.keys or self.values < 1:
      raise ValueError(f"need 1 <= queries <= keys and values >= 1, got "
                       f"{self}")


TASKS = {
    "niah_single_number": Needles("numbers"),
    "niah_single_word": Needles("words"),
    "niah_single_uuid": Needles("uuids"),
    "niah_multikey": Needles("numbers", keys=4),
    "niah_multivalue": Needles("numbers", values=4),
    "niah_multiquery": Needles("numbers", keys=4, queries=4),
}


def draw_word(rng: np.random.Generator) -> str:
  return (f"{words.ADJECTIVES[rng.integers(len(words.ADJECTIVES))]}-"
          f"{words.NOUNS[rng.integers(len(words.NOUNS))]}")


def draw_value(kind: str, rng: np.random.Generator) -> str:
  if kind == "numbers":
    return str(int(rng.integers(1_000_000, 10_000_000)))
  if kind == "words":
    return draw_word(rng)
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def join_keys(keys: list[str]) -> str:
  """``a``, ``a and b``, ``a, b, and c``: RULER's query of several keys."""
  if len(keys) == 1:
    return keys[0]
  return ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah(task: str, tokenizer: Tokenizer, text: str, length: int,
         seed: int) -> RulerSample:
  """A ``task`` prompt (one of ``TASKS``) of exactly ``length`` tokens,
  reproducible from ``seed``; ``text`` is the haystack."""
  spec = TASKS[task]
  rng = np.random.default_rng(seed)
  used: set[str] = set()
  keys = [fresh(lambda: draw_word(rng), text, used) for _ in range(spec.keys)]
  values = [[fresh(lambda: draw_value(spec.kind, rng), text, used)
             for _ in range(spec.values)] for _ in keys]
  needles = [NEEDLE.format(kind=spec.kind, key=key, value=value)
             for key, key_values in zip(keys, values) for value in key_values]
  needles = [needles[i] for i in rng.permutation(len(needles))]
  asked = sorted(rng.choice(len(keys), spec.queries, replace=False))
  query = join_keys([keys[i] for i in asked])
  context, question, prefix, starts = fit_haystack(
      tokenizer, text, length, INSTRUCTION.format(kind=spec.kind), needles,
      QUESTION.format(kind=spec.kind, query=query),
      ANSWER_PREFIX.format(kind=spec.kind, query=query), rng)
  answers = tuple(value for i in asked for value in values[i])
  return RulerSample(task, context, question, prefix, answers, starts)
