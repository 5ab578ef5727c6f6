"""``sensitivity``: bits where the attention output suffers most.

For every (layer, head, bit width) the head's causal attention output on the
calibration text is recomputed from its quantized keys and values (tokens
within the residual window read exact, as the cache does) and compared with
the exact one; ``allocate`` minimises the summed relative error under the
budget.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from lmcache_jax.engine import calibration
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import CALIBRATION


def head_errors(acts: calibration.Activations, group: int, group_size: int,
                residual: int, key_scale: np.ndarray,
                storage: calibration.Storage) -> np.ndarray:
  """Relative attention-output error [L, K, len(BITS)] of the cache as
  ``storage`` transforms it."""
  num_layers, num_kv = acts.keys_rope.shape[:2]
  errors = np.zeros((num_layers, num_kv, len(calibration.BITS)))
  for l in range(num_layers):
    for k in range(num_kv):
      q = jnp.asarray(acts.queries[l, k * group:(k + 1) * group])
      for i, b in enumerate(calibration.BITS):
        errors[l, k, i] = float(calibration.attention_error(
            q, jnp.asarray(acts.keys_rope[l, k]), jnp.asarray(acts.values[l, k]),
            jnp.asarray(key_scale[l, k]), storage.shift(l, k),
            fmt=format_for_bits(b), group_size=group_size, residual=residual,
            rotate=storage.rotate, outliers=storage.outliers))
  return errors


@CALIBRATION.register("sensitivity")
@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Per-head bits minimising measured attention-output error."""
  name: ClassVar[str] = "sensitivity"

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    cfg = lm.cfg
    ones = np.ones((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
                   np.float32)
    errors = head_errors(acts, cfg.group_size, group_size, residual, ones,
                         storage)
    template = QuantPlan.uniform(cfg, "int4", group_size=group_size,
                                 residual=residual, sinks=sinks,
                                 key_scale=ones, policy=self.name,
                                 rotate=storage.rotate,
                                 key_shift=storage.key_shift)
    return calibration.plan_for(cfg, errors, bits, template)
