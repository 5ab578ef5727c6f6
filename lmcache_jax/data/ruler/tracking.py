"""RULER's variable tracking (multi-hop tracing), on real text.

One chain of ``hops`` assignments, ``VAR A = 12345`` then ``VAR B = VAR A``,
``VAR C = VAR B``, ..., each on a line of its own at increasing seeded depths
in a window of the text; the question gives the value and asks for every
variable that holds it. Names are 5 seeded capital letters (RULER's), values
5-digit numbers; RULER's defaults are one chain of four hops.
"""

from __future__ import annotations

import string

import numpy as np

from lmcache_jax.data.passkey import Tokenizer
from lmcache_jax.data.ruler.prompt import RulerSample, fit_haystack, fresh

INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden "
               "in the following text.\n\n")
QUESTION = ("\nQuestion: Find all variables that are assigned the value "
            "{value} in the text above.")
# RULER's prefix ends in a space, which splits the first name's token from
# its space under a BPE tokenizer: it ends before it here.
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment "
                 "in the text above, {count} variables are assigned the value "
                 "{value}, they are:")
HOPS = 4


def draw_name(rng: np.random.Generator) -> str:
  letters = rng.choice(list(string.ascii_uppercase), 5)
  return "".join(letters)


def variable_tracking(tokenizer: Tokenizer, text: str, length: int,
                      seed: int, hops: int = HOPS) -> RulerSample:
  """A prompt of exactly ``length`` tokens, reproducible from ``seed``."""
  if hops < 1:
    raise ValueError(f"hops must be >= 1, got {hops}")
  rng = np.random.default_rng(seed)
  used: set[str] = set()
  names = [fresh(lambda: draw_name(rng), text, used) for _ in range(hops + 1)]
  value = fresh(lambda: str(int(rng.integers(10_000, 100_000))), text, used)
  chain = [f"VAR {names[0]} = {value}"] + [
      f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))]
  context, question, prefix, starts = fit_haystack(
      tokenizer, text, length, INSTRUCTION, chain,
      QUESTION.format(value=value),
      ANSWER_PREFIX.format(count=len(names), value=value), rng)
  return RulerSample("vt", context, question, prefix, tuple(names), starts)
