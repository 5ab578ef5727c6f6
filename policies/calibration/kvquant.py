"""``kvquant``: per-channel key scales fitted before RoPE, outliers exact.

KVQuant observes that a few key channels carry outliers, consistently across
tokens, and that they are visible before RoPE mixes channel pairs. Dividing
each key channel by its calibrated magnitude before per-token quantization
(and multiplying back on read) keeps those outlier channels from stretching
every token's grid. Scales are tied on each RoPE pair (d, d + Hd/2), where
dividing commutes with the rotation, so the cache's post-RoPE keys can be
scaled. Outliers stay in full precision twice over, as in KVQuant: the first
``sink_tokens`` tokens, and in every stored vector the ``outlier_fraction``
of entries of largest magnitude (dense-and-sparse; at least one). Bits are
allocated as in ``sensitivity``, measured with these scales and outliers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from lmcache_jax.engine import calibration
from lmcache_jax.quant.plan import QuantPlan
from policies.calibration.sensitivity import divergence_costs
from policies.registry import CALIBRATION


def channel_scales(keys: np.ndarray, quantile: float) -> np.ndarray:
  """[L, K, Hd] divisors from pre-RoPE keys [L, K, T, Hd], tied per RoPE pair.

  A channel's magnitude is the ``quantile`` of |key| over tokens (robust to
  a single extreme token); scales are normalised to mean 1.
  """
  mag = np.quantile(np.abs(keys), quantile, axis=2)
  half = mag.shape[-1] // 2
  tied = np.maximum(mag[..., :half], mag[..., half:])
  scale = np.concatenate([tied, tied], axis=-1)
  scale = np.maximum(scale, 1e-3 * scale.max(axis=-1, keepdims=True))
  return (scale / scale.mean(axis=-1, keepdims=True)).astype(np.float32)


@CALIBRATION.register("kvquant")
@dataclasses.dataclass(frozen=True)
class KVQuant:
  """Pre-RoPE per-channel key scales + exact sink tokens + per-head bits."""
  name: ClassVar[str] = "kvquant"
  sink_tokens: int = 4
  quantile: float = 0.99
  outlier_fraction: float = 0.01

  def outliers(self, head_dim: int) -> int:
    """Entries per vector kept exact: the fraction of the head dim, at least
    one (none for a fraction of 0)."""
    if not 0 <= self.outlier_fraction < 1:
      raise ValueError(f"kvquant outlier_fraction must be in [0, 1), got "
                       f"{self.outlier_fraction!r}")
    if self.outlier_fraction == 0:
      return 0
    return max(1, round(self.outlier_fraction * head_dim))

  def calibrate(self, lm, acts: calibration.Activations | None, *,
                bits: float, group_size: int, residual: int, sinks: int,
                storage: calibration.Storage = calibration.Storage()
                ) -> QuantPlan:
    cfg = lm.cfg
    storage = dataclasses.replace(storage,
                                  outliers=self.outliers(cfg.head_dim))
    scales = channel_scales(acts.keys, self.quantile)
    costs = divergence_costs(lm, acts, group_size=group_size,
                             residual=residual,
                             sinks=max(sinks, self.sink_tokens),
                             key_scale=scales, storage=storage)
    template = QuantPlan.uniform(cfg, "int4", group_size=group_size,
                                 residual=residual,
                                 sinks=max(sinks, self.sink_tokens),
                                 key_scale=scales, policy=self.name,
                                 rotate=storage.rotate,
                                 key_shift=storage.key_shift,
                                 outliers=storage.outliers)
    return calibration.plan_for(cfg, costs, bits, template)
