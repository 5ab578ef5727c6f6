"""The seed workload of the model suite: Llama-2-13B shapes (random bf16
weights), 4K and 32K contexts, batch 1 and 16, beside Hugging Face transformers.

  python -m experiments.bench --suite=model
  python -m experiments.bench --suite=model --config=configs/bench/model.py:short      # batch 1 only
  python -m experiments.bench --suite=model --config=configs/bench/model.py:runlocal   # CPU smoke run

Memory decides what runs (weights 24.2 GiB in bf16). A full bf16 cache holds
800 KiB per token (40 layers x 2 x 5120 x 2 bytes): 4K x 16 needs 50 GiB,
which fits an 80 GB card only barely (skipped there when the estimate says
so; it runs on a 141 GB card), and 32K x 16 needs 400 GiB, which fits no
card. So 32K runs at batch 1 with the full cache, and at batch 16 with an
``attention_sink`` cache of 2048 tokens (+ one prefill chunk); 4K x 16 also
runs with that cache, as the comparison that fits everywhere.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "llama2-13b"      # a preset: real shapes, random weights
  config.dtype = "bfloat16"
  config.seed = 0
  config.workloads = ("4096x1:full", "4096x16:full",
                      "4096x16:attention_sink(budget=2048)", "32768x1:full",
                      "32768x16:attention_sink(budget=2048)")
  config.decode_tokens = 32        # greedy steps timed after the prefill
  config.prefill_chunk = 1024      # evicting policies stream in chunks; full: one pass
  config.repeats = 3               # timed prefills (after a compile warm-up)
  config.max_seconds = 20.0        # ...fewer when they take this long together
  config.hf_baseline = True        # transformers generate, when installed
  # its caches: the default (eager, DynamicCache) and the static cache with
  # the decode step compiled (_hf_baseline.CACHES)
  config.hf_caches = ("dynamic", "static")
  config.hf_timeout_s = 900         # both caches, compiles included
  config.copy_bytes = 2**31        # moved by the copy-bandwidth measurement
  # Decode over an int KV cache (stored as --kv_bits stores it) against a
  # bf16 one (experiments/benchmarks/_kv_decode.py): Llama-3-8B shapes, 32K
  # tokens x 16 sequences. The bf16 cache takes 64 GiB beside 15 GiB of
  # weights: skipped (with the numbers) on a card of 80 GB.
  config.kv_decode = ml_collections.ConfigDict({
      "model": "llama3-8b", "dtype": "bfloat16", "decode_tokens": 32,
      "workloads": ("32768x16:int4", "32768x16:dense")})
  if arg and "short" in arg.split(","):
    # what fits one 10-minute command on a card: the batch-1 rows beside
    # both transformers peers, one timed prefill each, and the kv_decode rows
    config.workloads = ("4096x1:full", "32768x1:full")
    config.repeats = 1
  if arg and "runlocal" in arg.split(","):
    config.model = "tiny"
    config.dtype = "float32"
    config.workloads = ("128x1:full", "128x4:full",
                        "256x4:attention_sink(budget=64)")
    config.decode_tokens = 8
    config.prefill_chunk = 32
    config.repeats = 2
    config.max_seconds = 10.0
    config.hf_timeout_s = 120
    config.copy_bytes = 2**24
    config.kv_decode.model = "smollm2-135m"   # int packing needs head_dim >= 32
    config.kv_decode.dtype = "float32"
    config.kv_decode.decode_tokens = 4
    config.kv_decode.workloads = ("128x2:int4", "128x2:dense")
  return config
