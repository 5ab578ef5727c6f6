"""The attention op the model calls, and every implementation behind it.

  op       ``attend``: write a layer's new tokens, pick the implementation by
           phase, cache format and backend (the seam)
  layer    ``LayerKV``, the cache as attention sees it, and slot writes
  flash    a chunk's causal self-attention (cuDNN on GPUs) and the exact
           log-sum-exp merge
  blocked  online-softmax attention and slot mass over blocks of slots (XLA)
  slots    attention over one written layer in any format: the general path
           and the reference
  packed   decode over packed (quantized) payloads with the fused kernel
  packed_prefill  prefill over packed payloads, read as decoding reads them
"""

from lmcache_jax.attention.layer import (LayerKV, is_quantized, layer_of,
                                         matmul_precision, write_slots,
                                         write_stacked)
from lmcache_jax.attention.op import Request, attend
from lmcache_jax.attention.slots import attend_slots

__all__ = ["LayerKV", "Request", "attend", "attend_slots", "is_quantized",
           "layer_of", "matmul_precision", "write_slots", "write_stacked"]
