"""``kivi``: KIVI as published (Liu et al., ICML 2024), tuning-free.

Keys are quantized per channel over groups of ``key_group`` tokens (a
float16 scale and minimum per channel and group), values per token over
groups of ``value_group`` channels, and the ``residual`` latest tokens stay
in full precision; the cache holds a key group's tokens exact until the
group is full (``QuantPlan.key_layout="channel"``, ``quant.payload``).

Defaults are the paper's LongBench setting, which its repository's
docs/long_bench.md states for KIVI-2 and KIVI-4 alike: group 32 for keys and
values, residual 128 (KIVI's code quantizes values per token over groups of
``group_size`` channels, the same 32). 128 rather than 32 because it is the
setting the published accuracy (2-bit within 1-2.5% of full precision, 4-bit
lossless on LongBench) was measured with; ``kivi(residual=32)`` gives the
smaller window of the repository's GSM8K example.

Being tuning-free, it reads no calibration text and ignores the run's
``group_size``, ``residual``, ``sinks``, ``rotate`` and ``center_keys``
(KIVI keeps no sink tokens, rotates nothing and centers nothing): its plan
is fixed by ``kv_bits`` and its own fields. ``copy_bits`` 16 holds the
residual in the cache's dtype, as KIVI does; ``experiments.setup`` keeps a
policy's own ``copy_bits`` over the config's.

Where it differs from KIVI's code: the residual window of the latest
``residual`` tokens is exact for keys and values alike (KIVI's key residual
fills to R and is then quantized at once, so it holds 0..R-1 keys); value
groups use this cache's per-token grid, which always spans 0 (a uint8 zero
code per group, docs/quantization.md); and evaluation reads the prompt as
decoding does (KIVI's prefill attends to the exact prompt).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lmcache_jax.engine import calibration
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant.plan import QuantPlan
from policies.registry import CALIBRATION


@CALIBRATION.register("kivi")
@dataclasses.dataclass(frozen=True)
class Kivi:
  """KIVI: keys per channel over 32-token groups, values per token over 32
  channels, the latest 128 tokens exact; ``kv_bits`` 2, 3, 4 or 8."""
  name: ClassVar[str] = "kivi"
  key_group: int = 32
  value_group: int = 32
  residual: int = 128
  copy_bits: int = 16

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    del acts, group_size, residual, sinks, storage   # tuning-free, see above
    if float(bits) != int(bits):
      raise ValueError(f"kivi stores every key and value at the same width: "
                       f"kv_bits must be 2, 3, 4 or 8, got {bits}")
    fmt = format_for_bits(int(bits)).name
    return QuantPlan.uniform(lm.cfg, fmt, group_size=self.value_group,
                             residual=self.residual, sinks=0,
                             policy=self.name, copy_bits=self.copy_bits,
                             key_layout="channel", key_group=self.key_group)
