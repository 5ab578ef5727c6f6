"""``pyramidkv``: SnapKV scores with a pyramid of per-layer budgets.

Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling": attention spreads widely in lower layers and funnels
into few tokens in upper ones, so budgets fall linearly with depth. Beyond the
shared observation window, layer 0 keeps ``2 b - b / beta`` tokens and the last
layer ``b / beta`` (b = budget - window, beta = 20 as in the paper), averaging
the uniform budget. A dense cache is sized for the largest layer, so its
slots (memory) are those of about twice the budget; the live tokens average it.
Observation window and decode-time eviction are SnapKV's (``evict_every=0``:
decoding keeps every new token, as in the paper).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from policies.eviction.snapkv import SnapKV
from policies.registry import EVICTION


@EVICTION.register("pyramidkv")
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
  """SnapKV with per-layer budgets falling linearly with depth (mean = budget)."""
  name = "pyramidkv"
  beta: int = 20

  def __post_init__(self):
    if not isinstance(self.beta, int) or self.beta < 1:
      raise ValueError(f"{self.name}: beta must be an integer >= 1, got "
                       f"{self.beta!r}")
    if isinstance(self.budget, int) and isinstance(self.window, int) and (
        self.window >= self.budget):
      raise ValueError(f"{self.name}: window ({self.window}) must be smaller "
                       f"than the budget ({self.budget})")
    super().__post_init__()

  def _ends(self) -> tuple[int, int]:
    spare = self.budget - self.window
    low = spare // self.beta
    return 2 * spare - low, low

  def layer_budgets(self, num_layers: int) -> np.ndarray:
    if num_layers == 1:
      return np.array([self.budget], np.int32)
    high, low = self._ends()
    spare = np.floor(np.linspace(high, low, num_layers)).astype(np.int32)
    return spare + self.window

  @property
  def min_budget(self) -> int:
    return self._ends()[1] + self.window

  @property
  def max_row_slots(self) -> int:
    return max(self._ends()[0] + self.window, self.budget)
