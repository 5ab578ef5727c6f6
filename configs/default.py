"""The default experiment: perplexity of the real SmolLM2-135M on Hamlet.

  python -m experiments.run --config=configs/default.py
  python -m experiments.run --task=generate --prompt="Name three planets."
  python -m experiments.run --config=configs/default.py:runlocal   # smoke run
  python -m experiments.run --task=reuse    # the store turns itself on for reuse

Any field can be overridden: ``--config.perplexity.chunk=128``. The flat flags
of ``experiments.run`` (--task, --model, --policy, --budget, --context, ...)
map onto the fields below.
"""

from __future__ import annotations

import ml_collections

from lmcache_jax.quant.plan import EXACT_TOKENS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "perplexity"
  config.model = "smollm2-135m"
  config.dtype = "auto"          # auto = bfloat16 on GPU/TPU, float32 on CPU
  config.seed = 0
  config.context = 2048          # tokens the cache must hold (the eval window)
  config.text = "hamlet"         # a Shakespeare work, or "corpus" for all of them
  config.text_file = ""          # any UTF-8 file instead of `text`
  config.output_dir = "runs"
  config.prefill_chunk = 512

  config.policy = ml_collections.ConfigDict()
  config.policy.name = "full"    # or a call string: "snapkv(window=32)"
  config.policy.budget = 0.0     # tokens (>= 1) or a fraction of the prompt (< 1);
                                 # 0 = 256 tokens for a policy that takes a budget

  config.quant = ml_collections.ConfigDict()
  config.quant.kv_bits = 16.0    # 16 = full precision; else average bits
  config.quant.calibration = "uniform"
  config.quant.plan = ""         # path of a saved quant plan
  config.quant.group_size = 64   # channels per scale/zero group
  # each query reads its `residual` newest tokens and the first `sinks` exact,
  # as copies of `copy_bits` (8 = int8 codes, 16 = the cache dtype; attention_sink
  # needs 16 and sinks >= its own)
  config.quant.residual = EXACT_TOKENS["residual"]
  config.quant.sinks = EXACT_TOKENS["sinks"]
  config.quant.copy_bits = EXACT_TOKENS["copy_bits"]
  config.quant.rotate = True     # Hadamard-rotate head vectors before quantizing
  config.quant.center_keys = True  # subtract calibrated key channel means
  config.quant.save_plan = ""    # directory a calibration saves its plan into
  config.quant.overwrite_plan = False  # save_plan may replace a plan saved there
  config.quant.calibration_text = "macbeth"  # Shakespeare work to calibrate on
  config.quant.calibration_tokens = 512
  config.quant.eval_chunk = 256  # quant_table/quant_spread: tokens per pass (a speed knob only)
  config.quant.spread_settings = ""  # quant_spread: "window:copy_bits,..." ("" = its defaults)
  config.quant.table = "policies"    # quant_table: "policies" (each calibration at each
                                     # budget, on table_texts) or "storage" (on `text`)
  config.quant.table_texts = "hamlet,othello"
  config.quant.table_bits = "2,3,4"
  config.quant.table_policies = "uniform,variance,sensitivity,kvquant,kivi"

  config.perplexity = ml_collections.ConfigDict()
  config.perplexity.num_tokens = 0   # tokens scored; 0 = `context`
  config.perplexity.chunk = 256      # tokens per forward pass (at most 64, and at
                                     # most the budget, under an evicting policy)
  config.perplexity.buckets = 8      # position buckets in the report

  config.passkey = ml_collections.ConfigDict()
  config.passkey.lengths = (1024,)        # prompt tokens (question and cue included)
  config.passkey.depths = (0.1, 0.5, 0.9) # where the key sits in the filler
  config.passkey.trials = 1               # seeded prompts per (length, depth)
  config.passkey.digits = 5
  config.passkey.max_new_tokens = 8
  config.passkey.chunk = 512              # prefill chunk
  config.passkey.mode = "prefill"         # compress after prefill, or "stream"

  config.needle = ml_collections.ConfigDict()
  config.needle.lengths = (1024,)         # the haystack is `text`
  config.needle.depths = (0.1, 0.5, 0.9)
  config.needle.trials = 1
  config.needle.max_new_tokens = 6
  config.needle.chunk = 512
  config.needle.mode = "prefill"

  config.generate = ml_collections.ConfigDict()
  config.generate.prompt = "Write a short poem about the sea."
  config.generate.chat = True        # wrap the prompt in the chat template
  config.generate.max_new_tokens = 64
  config.generate.temperature = 0.0
  config.generate.top_k = 0
  config.generate.top_p = 1.0

  config.store = ml_collections.ConfigDict()
  config.store.enabled = False      # reuse and multiturn turn it on themselves
  config.store.tiers = "host,disk"   # comma list of device, host, disk
  config.store.chunk_size = 256      # tokens per chunk
  config.store.device_mib = 1024     # per-tier capacities
  config.store.host_mib = 4096
  config.store.disk_mib = 16384
  config.store.dir = "runs/kv_store" # disk tier directory
  config.store.replacement = "lru"   # each tier's replacement rule: lru, lfu, fifo
  config.store.key_file = ""         # AES-256 key file: encrypts host + disk
  config.store.key_env = ""          # or the variable holding the key

  config.reuse = ml_collections.ConfigDict()
  config.reuse.doc_tokens = 2048     # the shared document
  config.reuse.questions = (
      "Who speaks first in this passage?",
      "Name two characters in this passage.",
      "Where does this scene take place?")
  config.reuse.max_new_tokens = 16
  config.reuse.repeats = 2           # timings are the best of these runs

  config.multiturn = ml_collections.ConfigDict()
  config.multiturn.context_tokens = 1024  # passage that opens the chat
  config.multiturn.messages = (
      "Summarize the passage above in one sentence.",
      "Who is the most important character?",
      "What might happen next?")
  config.multiturn.max_new_tokens = 16
  config.multiturn.repeats = 2

  if arg and "runlocal" in arg.split(","):
    config.context = 256
    config.generate.max_new_tokens = 16
    config.passkey.lengths = (256,)
    config.needle.lengths = (256,)
    config.reuse.doc_tokens = 512
    config.reuse.max_new_tokens = 4
    config.multiturn.context_tokens = 256
    config.multiturn.max_new_tokens = 4
  return config
