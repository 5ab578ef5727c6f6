"""Loads a Hugging Face checkpoint directory into the canonical weight layout.

A directory holds ``config.json`` and one or more ``*.safetensors`` files
(sharded ones listed in ``model.safetensors.index.json``). Hugging Face stores
linear weights torch-style ``[out, in]``; they are transposed here. Q and K are
already in the rotate-half RoPE convention, so nothing is permuted.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

# Registers bfloat16 with numpy, so safetensors can hand out BF16 tensors.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError, safe_open

from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.weights import (check_weights, context_within_window,
                                        gather_weights)

_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_INDEX = "model.safetensors.index.json"

_GLOBAL_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "lm_head": "lm_head.weight",
    "final_norm": "model.norm.weight",
}
_LAYER_TENSORS = {
    "layers.attn_norm": "input_layernorm.weight",
    "layers.q": "self_attn.q_proj.weight",
    "layers.k": "self_attn.k_proj.weight",
    "layers.v": "self_attn.v_proj.weight",
    "layers.q_bias": "self_attn.q_proj.bias",
    "layers.k_bias": "self_attn.k_proj.bias",
    "layers.v_bias": "self_attn.v_proj.bias",
    "layers.o": "self_attn.o_proj.weight",
    "layers.mlp_norm": "post_attention_layernorm.weight",
    "layers.gate": "mlp.gate_proj.weight",
    "layers.up": "mlp.up_proj.weight",
    "layers.down": "mlp.down_proj.weight",
}


def load_safetensors(directory: str | os.PathLike, dtype: Any = np.float32
                     ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads a Llama, Mistral or Qwen2 checkpoint: its config and weights.

  Tensors of any float dtype (bf16 included) are cast to ``dtype``.

  Raises:
    FileNotFoundError: the directory, its config.json or a listed shard is
      missing.
    ValueError: an unsupported architecture or setting, a missing tensor or
      one of the wrong shape.
  """
  directory = pathlib.Path(directory)
  dtype = np.dtype(dtype)
  if dtype.name not in ("float32", "float16", "bfloat16", "float64"):
    raise ValueError(f"dtype must be a float type such as np.float32 or "
                     f"bfloat16, got {dtype.name}")
  cfg = _config(_read_config(directory), directory)
  files = _tensor_files(directory)
  weights = _assemble(cfg, files, dtype, directory)
  check_weights(cfg, weights, str(directory))
  return cfg, weights


def _read_config(directory: pathlib.Path) -> dict:
  path = directory / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; a Hugging Face checkpoint "
                            "directory holds config.json and *.safetensors")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _config(hf: dict, directory: pathlib.Path) -> ModelConfig:
  where = directory / "config.json"
  arch = (hf.get("architectures") or [None])[0]
  if arch not in _ARCHITECTURES:
    raise ValueError(f"{where}: architecture {arch!r} is not supported; "
                     f"supported: {list(_ARCHITECTURES)}")

  def need(key: str) -> Any:
    if hf.get(key) is None:
      raise ValueError(f"{where} lacks {key!r}")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' "
                     "(SwiGLU) is supported")
  if arch != "Qwen2ForCausalLM" and (hf.get("attention_bias")
                                     or hf.get("mlp_bias")):
    raise ValueError(f"{where}: attention_bias / mlp_bias add biases to "
                     "o_proj and the MLP, which this model does not have")
  window = (hf.get("sliding_window") if hf.get("use_sliding_window", True)
            else None)
  hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
  eos = hf.get("eos_token_id")
  scaling, linear = _rope_scaling(hf.get("rope_scaling"), where)
  return ModelConfig(
      name=directory.name,
      vocab_size=int(need("vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(need("intermediate_size")),
      num_layers=int(need("num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      max_context=context_within_window(
          int(need("max_position_embeddings")), window, str(where)),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rope_scaling=scaling,
      rope_linear_factor=linear,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM",
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=tuple(eos if isinstance(eos, list) else
                          [] if eos is None else [eos]),
  )


def _rope_scaling(scaling: dict | None, where: pathlib.Path
                  ) -> tuple[tuple[float, float, float, int] | None, float]:
  """``rope_scaling`` as (ModelConfig.rope_scaling, rope_linear_factor)."""
  if not scaling:
    return None, 1.0
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "default":
    return None, 1.0
  if kind == "linear":
    return None, float(scaling["factor"])
  if kind == "llama3":
    return (float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"])), 1.0
  raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported; "
                   "supported: 'default', 'linear', 'llama3'")


def _tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the file that holds it, from the index or by listing."""
  index = directory / _INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise ValueError(f"{index} has no readable weight_map: {e!r}") from None
    files = {name: directory / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not shard.is_file():
        raise FileNotFoundError(f"shard {shard.name} listed in {index} does "
                                "not exist")
    return files
  shards = sorted(directory.glob("*.safetensors"))
  if not shards:
    raise FileNotFoundError(f"{directory} holds no *.safetensors file")
  files = {}
  for shard in shards:
    for name in _open(shard).keys():
      if name in files:
        raise ValueError(f"tensor {name!r} is in both {files[name].name} and "
                         f"{shard.name}")
      files[name] = shard
  return files


def _open(path: pathlib.Path):
  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as e:
    raise ValueError(
        f"{path} is not a readable safetensors file: {e}") from None


def _assemble(cfg: ModelConfig, files: dict[str, pathlib.Path],
              dtype: np.dtype, directory: pathlib.Path
              ) -> dict[str, np.ndarray]:
  """Transposes and stacks the Hugging Face tensors into canonical names."""
  handles = {}
  used = set()

  def canonical(name: str, hf_name: str, shape: tuple[int, ...]):
    if hf_name not in files:
      raise ValueError(f"{directory} lacks tensor {hf_name!r} (needed for "
                       f"{name} of a {cfg.num_layers}-layer model)")
    used.add(hf_name)
    path = files[hf_name]
    if path not in handles:
      handles[path] = _open(path)
    array = handles[path].get_tensor(hf_name)
    matrix = len(shape) == 2 and name != "embed"
    want = shape[::-1] if matrix else shape
    if array.shape != want:
      raise ValueError(f"{path.name}: tensor {hf_name!r} has shape "
                       f"{array.shape}, expected {want}")
    return array.T if matrix else array

  weights = gather_weights(cfg, dtype, lambda name, i, shape: canonical(
      name, _GLOBAL_TENSORS[name] if i is None
      else f"model.layers.{i}.{_LAYER_TENSORS[name]}", shape))
  # Tied checkpoints may still carry lm_head; older ones carry RoPE tables.
  extra = sorted(n for n in set(files) - used
                 if n != "lm_head.weight" and not n.endswith("inv_freq"))
  if extra:
    raise ValueError(f"{directory} holds {len(extra)} tensors this model does "
                     f"not use, e.g. {extra[:5]}")
  return weights
