"""RULER's scoring: string match, and a 95% interval for a cell's accuracy.

RULER scores every synthetic task with ``string_match_all``: the share of the
reference answers found, case-insensitively, anywhere in the prediction, so a
prompt with several answers (multi-value, multi-query, variable tracking,
word extraction) earns partial credit. A prompt is *solved* when every answer
is found; a cell's accuracy is the share of solved prompts, a proportion with
a Wilson interval, and RULER's own figure (the mean partial credit) goes
beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054   # the two-sided 95% normal quantile


def match_all(prediction: str, answers: Sequence[str]) -> float:
  """RULER's ``string_match_all`` for one prompt: the share of ``answers``
  that occur in ``prediction``, ignoring case."""
  if not answers:
    raise ValueError("a prompt needs at least one reference answer")
  text = prediction.lower()
  return sum(answer.lower() in text for answer in answers) / len(answers)


def wilson_interval(successes: int, trials: int, z: float = Z_95
                    ) -> tuple[float, float]:
  """The Wilson score interval of a proportion ``successes / trials``
  (two-sided, 95% by default). Unlike the normal interval it stays in [0, 1]
  and is not empty at 0% or 100%."""
  if trials < 1:
    raise ValueError(f"trials must be >= 1, got {trials}")
  if not 0 <= successes <= trials:
    raise ValueError(f"successes must be in [0, {trials}], got {successes}")
  p = successes / trials
  z2 = z * z
  center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
  half = (z / (1 + z2 / trials)) * math.sqrt(
      p * (1 - p) / trials + z2 / (4 * trials * trials))
  return max(0.0, center - half), min(1.0, center + half)


def cell(predictions: Sequence[str], answers: Sequence[Sequence[str]]
         ) -> dict:
  """A cell's figures: ``accuracy``, the share of prompts ``solved`` (every
  answer found), with its 95% Wilson interval ``low``/``high``, RULER's
  ``score`` (mean share of answers found) and the number of ``prompts``."""
  if len(predictions) != len(answers) or not predictions:
    raise ValueError(f"need one prediction per prompt, got "
                     f"{len(predictions)} predictions for {len(answers)} "
                     f"prompts")
  shares = [match_all(p, a) for p, a in zip(predictions, answers)]
  solved = sum(share == 1.0 for share in shares)
  low, high = wilson_interval(solved, len(shares))
  return {"accuracy": solved / len(shares), "low": low, "high": high,
          "score": sum(shares) / len(shares), "solved": solved,
          "prompts": len(shares)}
