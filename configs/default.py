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

from lmcache_jax import defaults


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
  config.prefill_chunk = defaults.PREFILL_CHUNK  # prompt tokens per forward pass

  config.policy = ml_collections.ConfigDict()
  config.policy.name = "full"    # or a call string: "snapkv(window=32)"
  config.policy.budget = 0.0     # tokens (>= 1) or a fraction of the prompt (< 1);
                                 # 0 = defaults.BUDGET (256) tokens for a policy
                                 # that takes a budget

  config.quant = ml_collections.ConfigDict()
  config.quant.kv_bits = 16.0    # 16 = full precision; else average bits
  config.quant.calibration = "uniform"
  config.quant.plan = ""         # path of a saved quant plan
  # defaults: lmcache_jax/defaults.py, shared with the Python API
  config.quant.group_size = defaults.GROUP_SIZE   # channels per scale/zero group
  # each query reads its `residual` newest tokens and the first `sinks` exact,
  # as copies of `copy_bits` (8 = int8 codes, 16 = the cache dtype; attention_sink
  # needs 16 and sinks >= its own)
  config.quant.residual = defaults.RESIDUAL
  config.quant.sinks = defaults.SINKS
  config.quant.copy_bits = defaults.COPY_BITS
  config.quant.rotate = defaults.ROTATE  # Hadamard-rotate head vectors before quantizing
  config.quant.center_keys = defaults.CENTER_KEYS  # subtract calibrated key channel means
  config.quant.save_plan = ""    # directory a calibration saves its plan into
  config.quant.overwrite_plan = False  # save_plan may replace a plan saved there
  config.quant.calibration_text = defaults.CALIBRATION_TEXT  # Shakespeare work to calibrate on
  config.quant.calibration_tokens = defaults.CALIBRATION_TOKENS
  config.quant.eval_chunk = defaults.SCORE_CHUNK  # quant_table/quant_spread: tokens per pass (a speed knob only)
  config.quant.spread_settings = ""  # quant_spread: "window:copy_bits,..." ("" = its defaults)
  config.quant.table = "policies"    # quant_table: "policies" (each calibration at each
                                     # budget, on table_texts) or "storage" (on `text`)
  config.quant.table_texts = "hamlet,othello"
  config.quant.table_bits = "2,3,4"
  config.quant.table_policies = "uniform,variance,sensitivity,kvquant,kivi"

  config.perplexity = ml_collections.ConfigDict()
  config.perplexity.num_tokens = 0   # tokens scored; 0 = `context`
  # tokens per forward pass (under an evicting policy at most 64 and at most
  # the budget: defaults.WORKING_CHUNK)
  config.perplexity.chunk = defaults.SCORE_CHUNK
  config.perplexity.buckets = 8      # position buckets in the report

  config.passkey = ml_collections.ConfigDict()
  config.passkey.lengths = (1024,)        # prompt tokens (question and cue included)
  config.passkey.depths = (0.1, 0.5, 0.9) # where the key sits in the filler
  config.passkey.trials = 1               # seeded prompts per (length, depth)
  config.passkey.digits = 5
  config.passkey.max_new_tokens = 8
  config.passkey.chunk = defaults.PREFILL_CHUNK  # prefill chunk
  config.passkey.mode = "prefill"         # compress after prefill, or "stream"

  config.needle = ml_collections.ConfigDict()
  config.needle.lengths = (1024,)         # the haystack is `text`
  config.needle.depths = (0.1, 0.5, 0.9)
  config.needle.trials = 1
  config.needle.max_new_tokens = 6
  config.needle.chunk = defaults.PREFILL_CHUNK
  config.needle.mode = "prefill"

  config.ruler = ml_collections.ConfigDict()
  config.ruler.tasks = "all"              # comma list of lmcache_jax.data.ruler.TASKS
  config.ruler.lengths = (1024,)          # prompt tokens (question and answer prefix included)
  config.ruler.prompts = 50               # seeded prompts per (task, length) cell
  config.ruler.mode = "query_agnostic"    # or "query_aware": the question is compressed too
  config.ruler.compression = 0.0          # share of the compressed tokens dropped (kvpress's
                                          # ratio); 0 = the policy's --budget
  config.ruler.max_new_tokens = 0         # 0 = RULER's per task (128 niah, 30 vt, 120 cwe, 50 fwe)
  config.ruler.batch_size = 10            # prompts per batched pass
  config.ruler.chunk = defaults.PREFILL_CHUNK

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
  config.store.chunk_size = defaults.STORE_CHUNK  # tokens per chunk
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
    config.ruler.prompts = 2
    config.ruler.max_new_tokens = 16
    config.reuse.doc_tokens = 512
    config.reuse.max_new_tokens = 4
    config.multiturn.context_tokens = 256
    config.multiturn.max_new_tokens = 4
  return config
