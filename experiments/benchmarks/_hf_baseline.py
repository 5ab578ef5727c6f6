"""Hugging Face transformers ``generate`` on the shapes of the model suite.

Run by ``experiments.benchmarks.model`` as a child process (its argument is a
JSON request; its last stdout line is a JSON report), so that PyTorch has the
card to itself. First it checks, on a small Llama in float32, that
transformers and this project compute the same logits and the same greedy
tokens from the same weights (this project's model on the CPU here); then it
times each workload with random bfloat16 weights, once per way of holding
the cache (``CACHES``): the default eager ``generate`` and the static cache
with its decode step compiled.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import transformers

from lmcache_jax.arch.config import ModelConfig

GIB = 2**30


def hf_config(cfg: ModelConfig) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=max(cfg.max_context, 32768),
      rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
      bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids),
      pad_token_id=0)


def hf_state_dict(cfg: ModelConfig, weights: dict) -> dict:
  """The canonical layout ([in, out], layers stacked) as a LlamaForCausalLM
  state dict ([out, in], one entry per layer)."""
  names = {"layers.attn_norm": "input_layernorm.weight",
           "layers.q": "self_attn.q_proj.weight", "layers.k": "self_attn.k_proj.weight",
           "layers.v": "self_attn.v_proj.weight", "layers.o": "self_attn.o_proj.weight",
           "layers.mlp_norm": "post_attention_layernorm.weight",
           "layers.gate": "mlp.gate_proj.weight", "layers.up": "mlp.up_proj.weight",
           "layers.down": "mlp.down_proj.weight"}
  tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
  state = {"model.embed_tokens.weight": tensor(weights["embed"]),
           "model.norm.weight": tensor(weights["final_norm"])}
  if not cfg.tie_embeddings:
    state["lm_head.weight"] = tensor(weights["lm_head"].T)
  for name, hf_name in names.items():
    for layer in range(cfg.num_layers):
      w = weights[name][layer]
      state[f"model.layers.{layer}.{hf_name}"] = tensor(w.T if w.ndim == 2 else w)
  return state


def check_same_function(device: str) -> dict:
  """Logits and greedy tokens of both implementations on one small model."""
  import jax.numpy as jnp

  from lmcache_jax.engine import generate
  from lmcache_jax.models import LoadedModel
  from lmcache_jax.models import llama
  from lmcache_jax.models.weights import expected_shapes

  cfg = ModelConfig(name="check", vocab_size=512, hidden_size=256,
                    intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_context=256,
                    rope_theta=10000.0, norm_eps=1e-5, bos_token_id=1,
                    eos_token_ids=(2,))
  rng = np.random.default_rng(0)
  weights = {n: (1 + 0.1 * rng.standard_normal(s) if n.endswith("norm") else
                 rng.standard_normal(s) / np.sqrt(s[-2])).astype(np.float32)
             for n, s in expected_shapes(cfg).items()}
  model = transformers.LlamaForCausalLM(hf_config(cfg)).to(device, torch.float32)
  model.load_state_dict(hf_state_dict(cfg, weights), strict=True)
  model.eval()
  tokens = rng.integers(3, cfg.vocab_size, (2, 40))
  with torch.no_grad():
    hf_logits = model(torch.as_tensor(tokens, device=device)).logits[:, -1]
    hf_tokens = model.generate(torch.as_tensor(tokens, device=device),
                               attention_mask=torch.ones(tokens.shape, device=device),
                               max_new_tokens=8, min_new_tokens=8, do_sample=False)
  lm = LoadedModel.from_module(llama.from_weights(cfg, weights, jnp.float32))
  ours = generate(lm, tokens.tolist(), max_new_tokens=8, stop_tokens=())
  ref = hf_logits.float().cpu().numpy()
  rel = float(np.linalg.norm(np.asarray(ours.prompt_logits) - ref) / np.linalg.norm(ref))
  same_tokens = hf_tokens[:, tokens.shape[1]:].cpu().tolist() == ours.tokens
  if rel > 1e-4 or not same_tokens:
    raise AssertionError(f"transformers and lmcache_jax disagree: relative logit "
                         f"error {rel:.2e}, same greedy tokens: {same_tokens}")
  return {"relative_logit_error": rel, "same_greedy_tokens": same_tokens}


def _sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


# How transformers holds the cache: its default (a DynamicCache grown each
# step, eager forward passes), or the peer a user would pick for speed: a
# preallocated StaticCache with the decode step compiled by torch.compile
# (``generate``'s own path on CUDA: ``cache_implementation="static"``).
CACHES = {"dynamic": "full (DynamicCache, eager)",
          "static": "full (StaticCache, torch.compile)"}


def generate_fn(model, ids, mask, cache: str, device: str):
  """gen(n) → n greedy tokens after the prompt (synchronized) through
  ``model.generate`` with the ``cache`` of ``CACHES``."""
  if cache not in CACHES:
    raise ValueError(f"unknown transformers cache {cache!r}; valid: "
                     f"{', '.join(CACHES)}")
  extra = {}
  if cache == "static":
    extra = dict(cache_implementation="static",
                 compile_config=transformers.CompileConfig(
                     fullgraph=True, mode="reduce-overhead"))

  def gen(n):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0,
                           **extra)
    _sync(device)
    return out
  return gen


def _release(model, device: str) -> None:
  """Frees what a workload left on the card: the static cache that
  ``generate`` keeps on the model for the next call of the same shape."""
  if hasattr(model, "_cache"):
    del model._cache
  if device == "cuda":
    torch.cuda.empty_cache()


def bench_one(model, cfg: ModelConfig, work: dict, cache: str, request: dict,
              device: str) -> dict:
  """One row: time to first token and ms per decode step of ``generate``
  with ``cache`` (``CACHES``) on one workload."""
  decode = request["decode_tokens"]
  batch, prompt_len = work["batch"], work["context"] - decode
  row = {"impl": f"transformers {transformers.__version__}",
         "context": work["context"], "batch": batch, "policy": CACHES[cache],
         "cache": cache, "prompt_tokens": prompt_len}
  try:
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)
    gen = generate_fn(model, ids, torch.ones_like(ids), cache, device)
    # warm-up: the longest generation first, so a static cache is allocated
    # once at its full length and every later call reuses it; the compiled
    # step records its CUDA graphs in the first calls
    for _ in range(2 if cache == "static" else 1):
      gen(decode + 1)
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    ttft, full = [], []
    while len(ttft) < request["repeats"]:
      start = time.perf_counter()
      gen(1)
      ttft.append(time.perf_counter() - start)
      start = time.perf_counter()
      gen(decode + 1)
      full.append(time.perf_counter() - start)
      if sum(ttft) + sum(full) > request["max_seconds"]:
        break
    first = statistics.median(ttft)
    step = (statistics.median(full) - first) / decode
    row.update({"kv_gib": 2 * cfg.num_layers * batch * cfg.num_kv_heads
                * work["context"] * cfg.head_dim * 2 / GIB,
                "ttft_s": first, "runs": len(ttft),
                "prefill_tok_s": batch * prompt_len / first,
                "decode_ms_step": step * 1e3, "decode_tok_s": batch / step,
                "peak_gib": (torch.cuda.max_memory_allocated() / GIB
                             if device == "cuda" else None), "note": ""})
  except torch.OutOfMemoryError:
    row["note"] = "skipped: out of memory on this card"
  except Exception as e:  # noqa: BLE001 -- a peer that fails is a row
    traceback.print_exc()
    row["note"] = f"failed: {type(e).__name__}: {e}"[:300]
  return row


def bench(cfg: ModelConfig, request: dict, device: str) -> list[dict]:
  """Rows of every workload with each of ``request["caches"]`` (default:
  every one of ``CACHES``), random bfloat16 weights."""
  torch.manual_seed(0)
  torch.set_default_dtype(torch.bfloat16)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(hf_config(cfg))
  torch.set_default_dtype(torch.float32)
  model.eval()
  rows = []
  for work in request["workloads"]:
    for cache in request.get("caches", tuple(CACHES)):
      rows.append(bench_one(model, cfg, work, cache, request, device))
      _release(model, device)
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def main(argv: list[str]) -> None:
  request = json.loads(argv[1])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False
  check = check_same_function(device)
  cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in request["model"].items()})
  rows = bench(cfg, request, device) if request["workloads"] else []
  print(json.dumps({"check": check, "rows": rows, "device": device,
                    "versions": {"torch": torch.__version__,
                                 "transformers": transformers.__version__}}))


if __name__ == "__main__":
  main(sys.argv)
