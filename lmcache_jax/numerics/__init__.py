"""Number formats of the quantized cache and their reference arithmetic.

  formats   int2/int3/int4/int8 (asymmetric, planar bit packing) and fp8
  schemes   quantize / dequantize references, KIVI-layout round trip
"""

from lmcache_jax.numerics.formats import FORMATS, Format, get_format

__all__ = ["FORMATS", "Format", "get_format"]
