"""``variance``: more bits for heads whose keys and values spread more.

Per-token asymmetric quantization adds noise of variance ``range² / (12 (2^b
- 1)²)`` per element, where ``range`` is the token's group range. The cost of
giving head (l, k) b bits is that noise summed over its keys and values on
the calibration text; ``allocate`` minimises the total under the budget.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from lmcache_jax.engine import calibration
from lmcache_jax.quant import transform
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import CALIBRATION


def spread(x: np.ndarray, group_size: int) -> np.ndarray:
  """Mean squared per-token group range of x [L, K, T, Hd] → [L, K]."""
  g = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
  return np.mean((g.max(-1) - g.min(-1)) ** 2, axis=(-1, -2))


@CALIBRATION.register("variance")
@dataclasses.dataclass(frozen=True)
class Variance:
  """Per-head bits from the spread of keys and values (no model queries)."""
  name: ClassVar[str] = "variance"

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    shift = (None if storage.key_shift is None
             else storage.key_shift[:, :, None, :])
    keys = np.asarray(transform.stored(acts.keys_rope, shift=shift,
                                       rotated=storage.rotate))
    values = np.asarray(transform.stored(acts.values,
                                         rotated=storage.rotate))
    size = spread(keys, group_size) + spread(values, group_size)
    levels = np.array([(1 << b) - 1 for b in calibration.BITS], np.float64)
    costs = size[..., None] / (12.0 * levels ** 2)
    template = QuantPlan.uniform(lm.cfg, "int4", group_size=group_size,
                                 residual=residual, sinks=sinks,
                                 policy=self.name, rotate=storage.rotate,
                                 key_shift=storage.key_shift)
    return calibration.plan_for(lm.cfg, costs, bits, template)
