"""Needle in a haystack: a fact hidden in real Shakespeare, asked for at the end.

Like Kamradt's "needle in a haystack" test, but the haystack is the Project
Gutenberg Shakespeare of ``lmcache_jax.data.shakespeare`` (real, long, varied
text, unlike passkey filler) and the needle a seeded random word, so an answer
cannot be guessed from the text. The needle is inserted at a line boundary.
"""

from __future__ import annotations

import numpy as np

from lmcache_jax.data.passkey import Sample, Tokenizer, assemble

WORDS = ("amber", "anchor", "badger", "banjo", "cactus", "canoe", "cobalt",
         "falcon", "glacier", "harbor", "lantern", "marble", "meteor", "orchid",
         "pepper", "quartz", "saddle", "tractor", "velvet", "walrus")
INTRO = "Read the text below and remember the secret word hidden in it.\n\n"
NEEDLE = "\nThe secret word is {word}.\n"
QUESTION = "\n\nWhat is the secret word?"
CUE = " The secret word is"


def line_start_near(tokenizer: Tokenizer, ids: list[int], index: int) -> int:
  """The first index >= ``index`` whose token follows a newline (or the end)."""
  for i in range(max(index, 1), len(ids)):
    if tokenizer.decode(ids[i - 1:i]).endswith("\n"):
      return i
  return len(ids)


def needle(tokenizer: Tokenizer, text: str, length: int, depth: float,
           seed: int) -> Sample:
  """A prompt of ``length`` tokens: a seeded window of ``text`` with a secret word.

  The window starts at a seeded line of the text; the needle goes at the first
  line boundary after ``depth`` of the haystack.
  """
  rng = np.random.default_rng(seed)
  word = WORDS[int(rng.integers(len(WORDS)))]
  lines = text.splitlines(keepends=True)
  if not lines:
    raise ValueError("the haystack text is empty")
  start = int(rng.integers(len(lines)))
  # Enough characters for the window (tokens are rarely under 2 characters),
  # wrapping around the end of the text.
  need = 4 * length
  window, i = [], start
  while sum(map(len, window)) < need:
    window.append(lines[i % len(lines)])
    i += 1
    if i - start > 10 * len(lines):
      raise ValueError("the haystack text is too short for this length")
  haystack = tokenizer.encode("".join(window), add_bos=False)
  needle_ids = tokenizer.encode(NEEDLE.format(word=word), add_bos=False)
  # Place at a line boundary: find it in the haystack first, then assemble
  # with that exact depth. The intro starts the sequence (BOS included).
  room = (length - len(needle_ids) - len(tokenizer.encode(INTRO))
          - sum(len(tokenizer.encode(s, add_bos=False))
                for s in (QUESTION, CUE)))
  if room < 1:
    raise ValueError(f"a prompt of {length} tokens is too short for the "
                     f"needle and question; ask for more tokens")
  at = line_start_near(tokenizer, haystack[:room], int(round(depth * room)))
  prompt, cue, needle_start = assemble(tokenizer, length, at / room, haystack,
                                       needle_ids, INTRO, QUESTION, CUE)
  return Sample(prompt, cue, word, needle_start)
