"""A RULER-style task family (Hsieh et al., 2024) on real text.

Every generator is ``generate(task, tokenizer, text, length, seed)``: a
``RulerSample`` of ``length`` tokens of the model's tokenizer (at most that
for the word-extraction tasks), reproducible from ``seed``, with ``text`` (a
Shakespeare work) as its haystack. ``scoring`` scores predictions as RULER
does. Tasks:

* ``niah_single_number``, ``niah_single_word``, ``niah_single_uuid``,
  ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``: needles
  (``niah``);
* ``vt``: variable tracking (``tracking``);
* ``cwe``, ``fwe``: common- and frequent-word extraction (``aggregation``).
"""

from __future__ import annotations

import functools

from lmcache_jax.data.passkey import Tokenizer
from lmcache_jax.data.ruler import aggregation, niah, tracking
from lmcache_jax.data.ruler.prompt import MODES, RulerSample, Split
from lmcache_jax.data.ruler.scoring import cell, match_all, wilson_interval

GENERATORS = {
    **{name: functools.partial(niah.niah, name) for name in niah.TASKS},
    "vt": tracking.variable_tracking,
    "cwe": aggregation.common_words,
    "fwe": aggregation.frequent_words,
}
TASKS = tuple(GENERATORS)
# Tokens RULER lets a model generate for each task.
MAX_NEW_TOKENS = {**{name: 128 for name in niah.TASKS},
                  "vt": 30, "cwe": 120, "fwe": 50}

__all__ = ["MAX_NEW_TOKENS", "MODES", "RulerSample", "Split", "TASKS", "cell",
           "generate", "match_all", "wilson_interval"]


def generate(task: str, tokenizer: Tokenizer, text: str, length: int,
             seed: int) -> RulerSample:
  """One prompt of ``task`` (one of ``TASKS``)."""
  if task not in GENERATORS:
    raise ValueError(f"unknown RULER task {task!r}; valid: {', '.join(TASKS)}")
  if length < 1:
    raise ValueError(f"length must be a positive number of tokens, got "
                     f"{length}")
  try:
    return GENERATORS[task](tokenizer, text, length, seed)
  except ValueError as e:
    raise ValueError(f"RULER task {task!r}: {e}") from None
