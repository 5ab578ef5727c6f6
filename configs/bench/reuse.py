"""The reuse suite's settings: Llama-2-13B shapes (random bf16 weights), a
4K and a 32K prompt, a bf16 and a packed int4 cache, beside transformers'
cold time to first token.

  python -m experiments.bench --suite=reuse
  python -m experiments.bench --suite=reuse --config=configs/bench/reuse.py:runlocal   # CPU smoke run

Fields: ``preset`` (random weights of its shapes), ``contexts`` (prompt
tokens), ``formats`` (bf16 or a uniform plan's format), ``chunk_size`` (the
store's), ``prefill_chunk`` (None: each prompt in one pass), ``disk_dir``
("" = a temporary directory), ``repeats``, ``time_budget_s`` (workloads
still to run when it is spent are skipped with a note), ``hf_baseline``
(transformers' cold TTFT, when installed), ``link_bytes`` (moved by the
host-link measurement).
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.preset = "llama2-13b"
  config.contexts = (4096, 32768)
  config.formats = ("bf16", "int4")
  config.chunk_size = 256
  config.prefill_chunk = None
  config.disk_dir = ""
  config.repeats = 3
  config.time_budget_s = 330.0
  config.hf_baseline = True
  config.link_bytes = 2**30
  if arg and "runlocal" in arg.split(","):
    config.preset = "smollm2-135m"   # int4 groups of 64 need head_dim >= 64
    config.contexts = (200,)
    config.chunk_size = 64
    config.repeats = 1
    config.hf_baseline = False
    config.link_bytes = 2**20
  return config
