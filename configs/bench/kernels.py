"""The kernel suite's shapes: Llama-3-8B attention (32 query heads, 8 kv
heads, head dim 128), one decode token for each of 16 sequences over a
32K-token int4 cache in groups of 128 channels.

  python -m experiments.bench --suite=kernels
  python -m experiments.bench --suite=kernels --config=configs/bench/kernels.py:runlocal   # CPU smoke run

The int4 codes of a 32K x 16 cache take 0.6 GB, its bf16 copy 2.1 GB: the
suite fits any card.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.batch = 16
  config.kv_heads = 8
  config.q_per_kv = 4
  config.head_dim = 128
  config.context = 32768
  config.group_size = 128
  config.copy_bytes = 2**31      # moved by the copy-bandwidth measurement
  # (slots per block, warps, slots per split, pipeline stages) tried; the
  # first is the kernel's default for int4
  config.blocks = ((128, 2, 512, 3), (64, 1, 512, 3), (64, 1, 2048, 3),
                   (128, 2, 1024, 3), (128, 4, 512, 3), (128, 2, 512, 2))
  if arg and "runlocal" in arg.split(","):
    config.batch = 2
    config.kv_heads = 2
    config.context = 1024
    config.copy_bytes = 2**23
    config.blocks = ((128, 2, 512, 3), (64, 1, 512, 3))
  return config
