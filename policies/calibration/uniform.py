"""``uniform``: the same integer format for every layer and head."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lmcache_jax.engine import calibration
from lmcache_jax.numerics.formats import format_for_bits, get_format
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import CALIBRATION


@CALIBRATION.register("uniform")
@dataclasses.dataclass(frozen=True)
class Uniform:
  """Every head at ``kv_bits`` (2, 3, 4 or 8); no calibration text needed.

  ``fmt`` names the format instead (e.g. ``uniform(fmt='fp8')``).
  """
  name: ClassVar[str] = "uniform"
  fmt: str = ""

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    del acts
    knobs = dict(group_size=group_size, residual=residual, sinks=sinks,
                 rotate=storage.rotate, key_shift=storage.key_shift)
    if self.fmt:
      fmt = get_format(self.fmt)
      if fmt.bits != bits:
        raise ValueError(f"uniform(fmt={self.fmt!r}) stores {fmt.bits} bits "
                         f"but kv_bits={bits}")
      return QuantPlan.uniform(lm.cfg, fmt.name, policy=f"uniform-{fmt.name}",
                               **knobs)
    if float(bits) != int(bits):
      raise ValueError(f"uniform calibration needs whole bits (2, 3, 4, 8), "
                       f"got kv_bits={bits}; use variance or sensitivity "
                       f"for a fractional average")
    fmt = format_for_bits(int(bits)).name
    return QuantPlan.uniform(lm.cfg, fmt, policy=self.name, **knobs)
