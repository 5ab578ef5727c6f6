"""Passkey retrieval: a random number hidden at a chosen depth in filler text.

The synthetic test of Mohtashami & Jaggi (2023, "Landmark Attention"), used by
StreamingLLM, SnapKV and most KV-cache papers: repetitive filler, one line
``The pass key is N. Remember it. N is the pass key.`` at ``depth`` (0 = start,
1 = end of the filler), then the question. Built in token space so a prompt
has exactly the requested length whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important "
         "information there.\n")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go."
          " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key?"
CUE = " The pass key is"


class Tokenizer(Protocol):
  """``encode(text)`` starts a sequence (BOS first if the model asks for it);
  ``encode(text, add_bos=False)`` continues one."""
  def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class Sample:
  """One retrieval prompt.

  ``prompt`` ends with the question; ``cue`` (the start of the answer) is fed
  after it, so every answer token is predicted from the (compressed) cache.
  ``needle_start`` is the token index where the hidden fact begins.
  """
  prompt: list[int]
  cue: list[int]
  answer: str
  needle_start: int

  @property
  def num_tokens(self) -> int:
    return len(self.prompt) + len(self.cue)


def check_request(length: int, depth: float, fixed: int) -> None:
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1] (fraction of the filler before "
                     f"the hidden fact), got {depth}")
  if length < fixed + 1:
    raise ValueError(f"a prompt of {length} tokens cannot hold the intro, "
                     f"fact, question and answer cue ({fixed} tokens); ask for "
                     f"at least {fixed + 1}")


def assemble(tokenizer: Tokenizer, length: int, depth: float, haystack:
             list[int], needle: list[int], intro: str, question: str,
             cue: str) -> tuple[list[int], list[int], int]:
  """[intro][haystack before][needle][haystack after][question] + cue ids.

  The intro starts the sequence (with BOS when the model asks for it).
  ``haystack`` must hold enough tokens; it is cut so the total is ``length``.
  """
  head, tail, cue_ids = (tokenizer.encode(intro),
                         tokenizer.encode(question, add_bos=False),
                         tokenizer.encode(cue, add_bos=False))
  fixed = len(head) + len(needle) + len(tail) + len(cue_ids)
  check_request(length, depth, fixed)
  room = length - fixed
  if len(haystack) < room:
    raise ValueError(f"the haystack has {len(haystack)} tokens; {room} needed")
  before = int(round(depth * room))
  prompt = head + haystack[:before] + needle + haystack[before:room] + tail
  return prompt, cue_ids, len(head) + before


def passkey(tokenizer: Tokenizer, length: int, depth: float,
            seed: int, digits: int = 5) -> Sample:
  """A passkey prompt of ``length`` tokens (prompt + cue), reproducible from ``seed``."""
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  rng = np.random.default_rng(seed)
  key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
  filler = tokenizer.encode(FILLER, add_bos=False)
  haystack = filler * (length // max(len(filler), 1) + 1)
  needle = tokenizer.encode(NEEDLE.format(key=key), add_bos=False)
  prompt, cue, start = assemble(tokenizer, length, depth, haystack, needle,
                                INTRO, QUESTION, CUE)
  return Sample(prompt, cue, key, start)


def first_answer(text: str, answer: str) -> bool:
  """Whether the generated ``text`` starts its answer with ``answer``.

  Leading whitespace and punctuation are ignored; the answer must be followed
  by a non-word character or the end (12345 does not match 123456).
  """
  stripped = text.lstrip(" \t\n:\"'*")
  if not stripped.lower().startswith(answer.lower()):
    return False
  rest = stripped[len(answer):]
  return not rest or not (rest[0].isalnum() or rest[0] == "_")
