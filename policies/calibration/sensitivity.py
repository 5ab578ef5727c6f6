"""``sensitivity``: bits where the model's predictions suffer most.

The cost of storing head (l, k) at b bits is measured, not modelled: the KL
divergence of the model's next-token distributions on the calibration text
from its exact ones when that head alone holds its keys and values as a
b-bit cache stores them (``divergence.head_divergence``; queries read their
recent window and sinks exact, as decoding does). KL is what the head adds
to the text's NLL on average, so costs compare across layers as well as
heads, and ``allocate`` minimises their sum under the budget. Measuring
runs the rest of the model once per (layer, head, width) from that layer
on; the costs are kept for the next budget of the same calibration.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from lmcache_jax.engine import calibration
from lmcache_jax.engine.divergence import head_divergence
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant import transform
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import CALIBRATION


def storage_error(x, bits: int, group_size: int, scale=None, shift=None,
                  storage: calibration.Storage = calibration.Storage()
                  ) -> np.ndarray:
  """x̂ - x [..., T, Hd] float32 for x stored at ``bits`` through the cache's
  transform (``transform.stored``: divided by ``scale``, centered on
  ``shift``, rotated and with outliers kept as ``storage`` says)."""
  rotated = storage.rotate
  kept = schemes.fake_quant(transform.stored(x, scale, shift, rotated),
                            format_for_bits(bits), group_size,
                            storage.outliers)
  return np.asarray(transform.restored(kept, scale, shift, rotated)
                    - jnp.asarray(x, jnp.float32))


# the last costs measured, for the next budget: (model, settings, costs)
_last: list = [None, None, None]


def divergence_costs(lm, acts: calibration.Activations, *, group_size: int,
                     residual: int, sinks: int, key_scale: np.ndarray,
                     storage: calibration.Storage) -> np.ndarray:
  """Cost [L, K, len(BITS)] of every head at every width (module
  docstring), keys scaled by ``key_scale`` [L, K, Hd]."""
  settings = (acts.tokens.tobytes(), group_size, residual, sinks,
              key_scale.tobytes(), storage.rotate, storage.outliers,
              None if storage.key_shift is None
              else storage.key_shift.tobytes())
  model = _last[0] and _last[0]()
  if model is not lm or _last[1] != settings:
    scale = key_scale[:, :, None, :]
    shift = (None if storage.key_shift is None
             else storage.key_shift[:, :, None, :])
    keys = np.stack([storage_error(acts.keys_rope, b, group_size, scale,
                                   shift, storage)
                     for b in calibration.BITS])
    values = np.stack([storage_error(acts.values, b, group_size,
                                     storage=storage)
                       for b in calibration.BITS])
    _last[:] = [weakref.ref(lm), settings,
                head_divergence(lm, acts.tokens, keys, values,
                                residual=residual, sinks=sinks)]
  return _last[2]


@CALIBRATION.register("sensitivity")
@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Per-head bits minimising the measured KL divergence they cause."""
  name: ClassVar[str] = "sensitivity"

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    cfg = lm.cfg
    ones = np.ones((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
                   np.float32)
    costs = divergence_costs(lm, acts, group_size=group_size,
                             residual=residual, sinks=sinks, key_scale=ones,
                             storage=storage)
    template = QuantPlan.uniform(cfg, "int4", group_size=group_size,
                                 residual=residual, sinks=sinks,
                                 key_scale=ones, policy=self.name,
                                 rotate=storage.rotate,
                                 key_shift=storage.key_shift)
    return calibration.plan_for(cfg, costs, bits, template)
