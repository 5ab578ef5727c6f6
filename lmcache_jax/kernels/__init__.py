"""Pallas kernels, each beside its jnp reference and its public wrapper.

  quantize.quantize_pack           float rows → packed codes, scales, zeros
  dequantize.unpack_dequantize     packed rows → float rows
  decode_attention.decode_attention  fused dequant + GQA decode attention,
                                   split along the sequence, with slot logits
  stacked_decode.stacked_decode_attention  decode attention over one layer of
                                   the layer-stacked 16-bit cache, in place
  stacked_matmul.stacked_matmul    a few rows times one layer of a stacked
                                   weight, in place
  masking                          the masked logit and the visibility rule
                                   every attention path shares
  backend                          which implementation a wrapper runs
"""
