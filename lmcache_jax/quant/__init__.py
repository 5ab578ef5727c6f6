"""KV-cache quantization: plans, transforms and the packed payload.

  plan      QuantPlan: format per (layer, kv head), group, residual, sinks
  transform centering, channel scaling and Hadamard rotation before quantizing
  payload   the packed cache leaves and how tokens are written (kernels)

Number formats live one layer down (``lmcache_jax.numerics``); calibration,
which runs the model, one layer up (``lmcache_jax.engine.calibration``).
"""

from lmcache_jax.numerics.formats import FORMATS, Format, get_format
from lmcache_jax.quant.plan import QuantPlan

__all__ = ["FORMATS", "Format", "QuantPlan", "get_format"]
