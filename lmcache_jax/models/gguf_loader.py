"""Loads a llama.cpp GGUF file into the canonical weight layout.

Three things separate a GGUF file from the layout of ``weights.py``, and this
module undoes each:

* numpy views of GGUF tensors are torch-style ``[out, in]`` (ggml lists the
  dims in reverse), so matrices are transposed; ``token_embd`` is ``[V, D]``;
* tensors may be block-quantized; ``gguf.quants`` dequantizes them;
* in ``llama`` files, llama.cpp's converter (``LlamaModel.permute`` in
  ``convert_hf_to_gguf.py``) reorders the rows of Q and K within each head,
  ``w.reshape(n, 2, hd // 2, ...).swapaxes(1, 2)`` with ``n`` the query heads
  for Q and the kv heads for K, so that GGML's interleaved RoPE, which rotates
  rows ``(2i, 2i + 1)``, meets the pairs that Hugging Face's rotate-half RoPE
  uses, ``(i, i + hd // 2)``. The inverse is applied here. ``qwen2`` files are
  written unpermuted: llama.cpp runs them with NEOX (rotate-half) RoPE.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

import gguf
import numpy as np

from lmcache_jax.arch import rope
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.weights import (check_weights, context_within_window,
                                        gather_weights)

# Architecture -> whether its Q/K rows were permuted by the converter.
_PERMUTED = {"llama": True, "qwen2": False}

_GLOBAL_TENSORS = {
    "embed": "token_embd.weight",
    "lm_head": "output.weight",
    "final_norm": "output_norm.weight",
}
_LAYER_TENSORS = {
    "layers.attn_norm": "attn_norm.weight",
    "layers.q": "attn_q.weight",
    "layers.k": "attn_k.weight",
    "layers.v": "attn_v.weight",
    "layers.q_bias": "attn_q.bias",
    "layers.k_bias": "attn_k.bias",
    "layers.v_bias": "attn_v.bias",
    "layers.o": "attn_output.weight",
    "layers.mlp_norm": "ffn_norm.weight",
    "layers.gate": "ffn_gate.weight",
    "layers.up": "ffn_up.weight",
    "layers.down": "ffn_down.weight",
}
# Llama-3 scaling baked into per-frequency divisors by the converter.
_ROPE_FREQS = "rope_freqs.weight"
# The converter's default for `original_max_position_embeddings`.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_REQUIRED = object()


def load_gguf(path: str | os.PathLike, dtype: Any = np.float32,
              reader: gguf.GGUFReader | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads a ``llama`` or ``qwen2`` GGUF file: its config and canonical weights.

  Every tensor is dequantized to ``dtype`` (float32, float16 or bfloat16).
  ``reader``, from ``open_gguf(path)``, spares a second parse of the header
  when the caller also reads the tokenizer.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not a readable GGUF, is of another architecture,
      lacks a tensor or holds one of the wrong shape or an unknown quant type.
  """
  path = pathlib.Path(path)
  dtype = _float_dtype(dtype)
  reader = open_gguf(path) if reader is None else reader
  meta = _Metadata(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  cfg = _config(meta, tensors, path)
  weights = _assemble(cfg, tensors, _PERMUTED[meta.arch], dtype, path)
  check_weights(cfg, weights, str(path))
  return cfg, weights


def _float_dtype(dtype: Any) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype.name not in ("float32", "float16", "bfloat16", "float64"):
    raise ValueError(f"dtype must be a float type such as np.float32 or "
                     f"bfloat16, got {dtype.name}")
  return dtype


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Parses a GGUF file's header, with a clear error for a bad file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return gguf.GGUFReader(path)
  # The reader fails on malformed input with whatever numpy or struct raise.
  except (ValueError, IndexError, KeyError, OverflowError) as e:
    raise ValueError(f"{path} is not a readable GGUF file (truncated or "
                     f"corrupt?): {type(e).__name__}: {e}") from None


class _Metadata:
  """Typed access to the key-value section, with errors that name the file."""

  def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path):
    self._fields = reader.fields
    self._path = path
    if int(self.get("split.count", 1)) > 1:
      raise ValueError(f"{path} is one part of a split GGUF; merge the parts "
                       "with llama.cpp's gguf-split --merge first")
    self.arch = self.get("general.architecture")
    if self.arch not in _PERMUTED:
      raise ValueError(f"{path} holds a {self.arch!r} model; supported GGUF "
                       f"architectures: {sorted(_PERMUTED)}")

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    field = self._fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise ValueError(f"{self._path} lacks the metadata key {key!r}")
      return default
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
      # Shortest decimal that round-trips the float32: 1e-5 stays 1e-5.
      value = float(str(np.float32(value)))
    return value

  def model(self, key: str, default: Any = _REQUIRED) -> Any:
    """An architecture-scoped key, e.g. ``llama.block_count``."""
    return self.get(f"{self.arch}.{key}", default)


def _config(meta: _Metadata, tensors: dict, path: pathlib.Path) -> ModelConfig:
  hidden = int(meta.model("embedding_length"))
  heads = int(meta.model("attention.head_count"))
  head_dim = meta.model("attention.key_length", None)
  if head_dim is None:
    if hidden % heads:
      raise ValueError(f"{path}: embedding_length={hidden} is not a multiple "
                       f"of head_count={heads} and no key_length is given")
    head_dim = hidden // heads
  head_dim = int(head_dim)
  value_dim = int(meta.model("attention.value_length", head_dim))
  rope_dim = int(meta.model("rope.dimension_count", head_dim))
  if value_dim != head_dim or rope_dim != head_dim:
    raise ValueError(
        f"{path}: key_length={head_dim}, value_length={value_dim} and "
        f"rope.dimension_count={rope_dim} must be equal for this model")
  if "token_embd.weight" not in tensors:
    raise ValueError(f"{path} has no token_embd.weight tensor")
  # ggml order: ne = [D, V].
  vocab = int(tensors["token_embd.weight"].shape[-1])
  if int(meta.model("vocab_size", vocab)) != vocab:
    raise ValueError(f"{path}: vocab_size={meta.model('vocab_size')} but "
                     f"token_embd.weight has {vocab} rows")
  theta = float(meta.model("rope.freq_base", 10000.0))
  linear_factor = _linear_factor(meta, path)
  scaling = None
  if _ROPE_FREQS in tensors:
    factors = gguf.quants.dequantize(tensors[_ROPE_FREQS].data,
                                     tensors[_ROPE_FREQS].tensor_type)
    scaling = _llama3_scaling(factors, theta, head_dim, path)
  return ModelConfig(
      name=path.stem,
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(meta.model("feed_forward_length")),
      num_layers=int(meta.model("block_count")),
      num_heads=heads,
      num_kv_heads=int(meta.model("attention.head_count_kv", heads)),
      head_dim=head_dim,
      max_context=context_within_window(
          int(meta.model("context_length")),
          meta.model("attention.sliding_window", None), str(path)),
      rope_theta=theta,
      rope_scaling=scaling,
      rope_linear_factor=linear_factor,
      norm_eps=float(meta.model("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
      eos_token_ids=_eos_ids(meta),
  )


def _linear_factor(meta: _Metadata, path: pathlib.Path) -> float:
  kind = meta.model("rope.scaling.type", "none")
  if kind == "none":
    return 1.0
  if kind == "linear":
    return float(meta.model("rope.scaling.factor"))
  raise ValueError(f"{path}: rope.scaling.type={kind!r} is not supported; "
                   "supported: 'none', 'linear' (and Llama-3 rope_freqs)")


def _eos_ids(meta: _Metadata) -> tuple[int, ...]:
  """EOS, EOT and the chat end-of-turn token ``<|im_end|>``, when present."""
  ids = [meta.get(f"tokenizer.ggml.{key}", None)
         for key in ("eos_token_id", "eot_token_id")]
  tokens = meta.get("tokenizer.ggml.tokens", [])
  if "<|im_end|>" in tokens:
    ids.append(tokens.index("<|im_end|>"))
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int,
                    path: pathlib.Path
                    ) -> tuple[float, float, float, int] | None:
  """Recovers ``ModelConfig.rope_scaling`` from llama.cpp's ``rope_freqs``.

  The converter stores Llama-3 scaling as one divisor per frequency and drops
  its parameters. The divisors fix ``factor`` and, in the blended band, a line
  in the frequency whose slope and intercept give ``(high - low) / original``
  and ``low / (high - low)``; any ``(original, low, high)`` with those ratios
  yields the same frequencies, so ``original`` is pinned to the converter's
  default and the result is checked against every divisor.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  if factors.shape != (head_dim // 2,):
    raise ValueError(f"{path}: {_ROPE_FREQS} has {factors.size} values, "
                     f"expected head_dim / 2 = {head_dim // 2}")
  if np.allclose(factors, 1.0):
    return None
  factor = float(factors.max())
  inv_freq = theta ** -(np.arange(0, head_dim, 2) / head_dim)
  band = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
  if band.sum() < 2:
    raise ValueError(
        f"{path}: {_ROPE_FREQS} has {band.sum()} blended frequencies; at least "
        "2 are needed to recover the Llama-3 rope scaling parameters")
  smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
  slope, intercept = np.polyfit(inv_freq[band], smooth, 1)
  original = _LLAMA3_ORIGINAL_CONTEXT
  span = original / (2 * math.pi * slope)
  low = -intercept * span
  scaling = (factor, float(f"{low:.6g}"), float(f"{low + span:.6g}"), original)
  probe = ModelConfig(name="probe", vocab_size=1, hidden_size=1,
                      intermediate_size=1, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=head_dim, max_context=1,
                      rope_theta=theta, rope_scaling=scaling)
  if not np.allclose(inv_freq / factors, rope.inverse_frequencies(probe),
                     rtol=1e-4):
    raise ValueError(f"{path}: {_ROPE_FREQS} does not follow Llama-3 rope "
                     f"scaling (best fit {scaling})")
  return scaling


def _assemble(cfg: ModelConfig, tensors: dict, permuted: bool,
              dtype: np.dtype, path: pathlib.Path) -> dict[str, np.ndarray]:
  """Dequantizes, un-permutes, transposes and stacks into canonical names."""
  used = {_ROPE_FREQS}
  heads = {"layers.q": cfg.num_heads, "layers.q_bias": cfg.num_heads,
           "layers.k": cfg.num_kv_heads, "layers.k_bias": cfg.num_kv_heads}

  def canonical(name: str, gguf_name: str, shape: tuple[int, ...]):
    tensor = tensors.get(gguf_name)
    if tensor is None:
      raise ValueError(f"{path} lacks tensor {gguf_name!r} (needed for {name} "
                       f"of a {cfg.num_layers}-layer model)")
    used.add(gguf_name)
    matrix = len(shape) == 2 and name != "embed"
    want = shape[::-1] if matrix else shape
    array = _dequantize(tensor, path)
    if array.shape != want:
      raise ValueError(f"{path}: tensor {gguf_name!r} has shape "
                       f"{array.shape}, expected {want}")
    if permuted and name in heads:
      array = _unpermute(array, heads[name])
    return array.T if matrix else array

  weights = gather_weights(cfg, dtype, lambda name, i, shape: canonical(
      name, _GLOBAL_TENSORS[name] if i is None
      else f"blk.{i}.{_LAYER_TENSORS[name]}", shape))
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{path} holds {len(extra)} tensors this model does not "
                     f"use, e.g. {extra[:5]}")
  return weights


def _dequantize(tensor: Any, path: pathlib.Path) -> np.ndarray:
  try:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ValueError(
        f"{path}: tensor {tensor.name!r} is stored as "
        f"{tensor.tensor_type.name}, which the gguf package cannot "
        "dequantize; re-quantize the file (e.g. Q8_0, Q4_K or F16)") from None


def _unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation (interleaved pairs -> halves)."""
  shape = rows.shape
  return (rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
          .swapaxes(1, 2).reshape(shape))
