"""Pallas kernels for the quantized KV cache, each beside its jnp reference.

  quantize.quantize_pack           float rows → packed codes, scales, zeros
  dequantize.unpack_dequantize     packed rows → float rows
  decode_attention.decode_attention  fused dequant + GQA decode attention,
                                   split along the sequence, with slot logits
"""
