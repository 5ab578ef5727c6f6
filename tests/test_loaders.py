"""GGUF and safetensors loaders, and presets, against checkpoints made here.

Each checkpoint is written the way its real producer writes it (llama.cpp's
converter for GGUF, Hugging Face for safetensors) from known canonical
weights, so loading it back must give those weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import gguf
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from lmcache_jax import fetch
from lmcache_jax.models.assets import default_gguf_path
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.gguf_loader import load_gguf
from lmcache_jax.models.presets import PRESETS, get_preset, random_weights
from lmcache_jax.models.safetensors_loader import load_safetensors
from lmcache_jax.models.weights import check_weights, expected_shapes
from reference_model import reference_logits

Q = gguf.GGMLQuantizationType
# Relative error (Frobenius) each storage type may add.
_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2,
              Q.Q4_1: 0.15}

_LAYER_NAMES = {  # canonical -> (Hugging Face, GGUF) per-layer names
    "layers.attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "layers.q": ("self_attn.q_proj.weight", "attn_q.weight"),
    "layers.k": ("self_attn.k_proj.weight", "attn_k.weight"),
    "layers.v": ("self_attn.v_proj.weight", "attn_v.weight"),
    "layers.q_bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "layers.k_bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "layers.v_bias": ("self_attn.v_proj.bias", "attn_v.bias"),
    "layers.o": ("self_attn.o_proj.weight", "attn_output.weight"),
    "layers.mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "layers.gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "layers.up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "layers.down": ("mlp.down_proj.weight", "ffn_down.weight"),
}
_GLOBAL_NAMES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
}


def _config(**overrides) -> ModelConfig:
  return dataclasses.replace(get_preset("tiny"), **overrides)


def _canonical(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Distinct random values everywhere, norms included, so swaps show."""
  rng = np.random.default_rng(seed)
  return {name: (0.5 * rng.standard_normal(shape)).astype(np.float32)
          for name, shape in expected_shapes(cfg).items()}


def _per_tensor(cfg, canonical):
  """Yields (canonical name, layer or None, hf name, gguf name, torch array)."""
  for name, array in canonical.items():
    if name in _GLOBAL_NAMES:
      hf, gg = _GLOBAL_NAMES[name]
      yield name, None, hf, gg, array if name == "embed" else array.T
      continue
    hf, gg = _LAYER_NAMES[name]
    for i in range(cfg.num_layers):
      yield (name, i, f"model.layers.{i}.{hf}", f"blk.{i}.{gg}",
             np.ascontiguousarray(array[i].T))


def _tokens(cfg: ModelConfig) -> list[str]:
  tokens = [f"tok{i}" for i in range(cfg.vocab_size)]
  tokens[:3] = ["<unk>", "<s>", "</s>"]
  tokens[7] = "<|im_end|>"
  return tokens


# -- GGUF, written as llama.cpp's convert_hf_to_gguf.py writes it ------------

def _llama_cpp_permute(w, n_head, n_head_kv):
  """`LlamaModel.permute` of convert_hf_to_gguf.py, verbatim in numpy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _write_gguf(path, cfg, canonical, *, arch="llama", types=None,
                drop=(), replace=None, extra_tensors=None, rope_scaling=None,
                sliding_window=None):
  """Writes `canonical` as the converter would; returns {gguf name: type}."""
  types = types or {}
  writer = gguf.GGUFWriter(path, arch)
  writer.add_context_length(cfg.max_context)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  if arch == "llama":
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
  if rope_scaling is not None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(rope_scaling)
  if sliding_window is not None:
    writer.add_sliding_window(sliding_window)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(_tokens(cfg))
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  stored = {}
  for name, _, _, gguf_name, array in _per_tensor(cfg, canonical):
    if gguf_name in drop:
      continue
    if arch == "llama" and name in ("layers.q", "layers.q_bias"):
      array = _llama_cpp_permute(array, cfg.num_heads, cfg.num_heads)
    if arch == "llama" and name in ("layers.k", "layers.k_bias"):
      array = _llama_cpp_permute(array, cfg.num_heads, cfg.num_kv_heads)
    array = (replace or {}).get(gguf_name, array)
    qtype = types.get(gguf_name, Q.F32)
    writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype),
                      raw_dtype=qtype)
    stored[gguf_name] = qtype
  for gguf_name, array in (extra_tensors or {}).items():
    writer.add_tensor(gguf_name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def _assert_matches(cfg, got, want, stored):
  assert set(got) == set(want)
  for name, layer, _, gguf_name, _ in _per_tensor(cfg, want):
    a = got[name] if layer is None else got[name][layer]
    b = want[name] if layer is None else want[name][layer]
    tol = _TOLERANCE[stored[gguf_name]]
    err = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)
    assert err <= tol, f"{gguf_name} ({stored[gguf_name].name}): {err:.3g}"


def test_permutation_turns_rotate_half_into_interleaved_rope():
  """Why the loader un-permutes: the converter's row order is what makes
  GGML's interleaved RoPE equal Hugging Face's rotate-half RoPE."""
  heads, hd, angle = 3, 8, np.linspace(0.1, 1.3, 4)
  q = np.random.default_rng(0).standard_normal((heads * hd, 5))
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

  def rotate_half(rows):
    a, b = rows[:hd // 2], rows[hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin])

  def interleaved(rows):
    out = rows.copy()
    out[0::2] = rows[0::2] * cos - rows[1::2] * sin
    out[1::2] = rows[1::2] * cos + rows[0::2] * sin
    return out

  hf = np.concatenate([rotate_half(h) for h in np.split(q, heads)])
  ggml = np.concatenate([interleaved(h) for h in np.split(
      _llama_cpp_permute(q, heads, None), heads)])
  np.testing.assert_allclose(ggml, _llama_cpp_permute(hf, heads, None))


def test_gguf_llama_round_trip(tmp_path):
  cfg = _config()
  want = _canonical(cfg)
  types = {"token_embd.weight": Q.F16, "output.weight": Q.Q8_0,
           "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.F16,
           "blk.0.ffn_gate.weight": Q.Q8_0, "blk.1.ffn_gate.weight": Q.Q8_0,
           "blk.0.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q4_1}
  path = tmp_path / "tiny.gguf"
  stored = _write_gguf(path, cfg, want, types=types)
  got_cfg, got = load_gguf(path)
  assert got_cfg == dataclasses.replace(cfg, name="tiny", eos_token_ids=(2, 7))
  _assert_matches(cfg, got, want, stored)
  # Q and K of layer 0 are F32: the un-permutation must be exact.
  np.testing.assert_array_equal(got["layers.q"][0], want["layers.q"][0])
  np.testing.assert_array_equal(got["layers.k"][0], want["layers.k"][0])


def test_gguf_qwen2_round_trip_keeps_rows_and_biases(tmp_path):
  cfg = _config(qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
                norm_eps=1e-6)
  want = _canonical(cfg, seed=1)
  types = {"blk.0.attn_q.weight": Q.BF16, "blk.1.ffn_up.weight": Q.Q8_0}
  path = tmp_path / "qwen.gguf"
  stored = _write_gguf(path, cfg, want, arch="qwen2", types=types)
  got_cfg, got = load_gguf(path, dtype=ml_dtypes.bfloat16)
  assert got_cfg == dataclasses.replace(cfg, name="qwen", eos_token_ids=(2, 7))
  assert {a.dtype for a in got.values()} == {np.dtype(ml_dtypes.bfloat16)}
  stored = dict.fromkeys(stored, Q.BF16)  # Everything went through bf16.
  _assert_matches(cfg, got, want, stored)


def _llama3_factors(head_dim, theta, factor, low, high, original):
  """`generate_extra_tensors` of the converter's LlamaModel: rope_freqs."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32)
                          / head_dim)
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < original / high:
      out.append(1)
    elif wavelen > original / low:
      out.append(factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 8192),  # Llama 3.1
                                     (32.0, 1.0, 4.0, 8192),  # Llama 3.2
                                     (16.0, 2.0, 8.0, 8192)])
def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path, scaling):
  # head_dim 64 != hidden / heads also exercises attention.key_length.
  cfg = _config(num_heads=2, num_kv_heads=1, head_dim=64, rope_theta=500000.0,
                rope_scaling=scaling)
  path = tmp_path / "llama3.gguf"
  _write_gguf(path, cfg, _canonical(cfg), extra_tensors={
      "rope_freqs.weight": _llama3_factors(64, 500000.0, *scaling)})
  got_cfg, _ = load_gguf(path)
  assert got_cfg.rope_scaling == scaling
  assert got_cfg.head_dim == 64


def test_gguf_linear_rope_scaling(tmp_path):
  cfg = _config(rope_linear_factor=4.0)
  path = tmp_path / "linear.gguf"
  _write_gguf(path, cfg, _canonical(cfg), rope_scaling=4.0)
  assert load_gguf(path)[0].rope_linear_factor == 4.0


# -- GGUF bad input ----------------------------------------------------------

def _valid_gguf(tmp_path, **kwargs):
  cfg = _config()
  path = tmp_path / "model.gguf"
  _write_gguf(path, cfg, _canonical(cfg), **kwargs)
  return cfg, path


def test_gguf_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf does not exist"):
    load_gguf(tmp_path / "nope.gguf")


def test_gguf_truncated(tmp_path):
  _, path = _valid_gguf(tmp_path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    load_gguf(path)


def test_gguf_text_file(tmp_path):
  path = tmp_path / "notes.gguf"
  path.write_text("just some text\n")
  with pytest.raises(ValueError, match="notes.gguf is not a readable GGUF"):
    load_gguf(path)


def test_gguf_unsupported_architecture(tmp_path):
  cfg = _config()
  path = tmp_path / "falcon.gguf"
  _write_gguf(path, cfg, _canonical(cfg), arch="falcon")
  with pytest.raises(ValueError, match=r"'falcon' model; supported GGUF "
                     r"architectures: \['llama', 'qwen2'\]"):
    load_gguf(path)


def test_gguf_wrong_shape(tmp_path):
  cfg = _config()
  bad = np.zeros((cfg.hidden_size, cfg.hidden_size), np.float32)
  _, path = _valid_gguf(tmp_path, replace={"blk.1.attn_k.weight": bad})
  with pytest.raises(ValueError, match=r"'blk.1.attn_k.weight' has shape "
                     r"\(64, 64\), expected \(32, 64\)"):
    load_gguf(path)


def test_gguf_missing_tensor(tmp_path):
  _, path = _valid_gguf(tmp_path, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match="lacks tensor 'blk.1.ffn_up.weight'"):
    load_gguf(path)


def test_gguf_extra_tensor(tmp_path):
  _, path = _valid_gguf(tmp_path, extra_tensors={
      "blk.2.attn_norm.weight": np.ones(64, np.float32)})
  with pytest.raises(ValueError, match=r"1 tensors this model does not use, "
                     r"e.g. \['blk.2.attn_norm.weight'\]"):
    load_gguf(path)


# -- safetensors, written as Hugging Face writes a checkpoint ----------------

def _write_hf(directory, cfg, canonical, *, arch="LlamaForCausalLM",
              shards=1, dtype=np.float32, **config_extra):
  directory.mkdir(exist_ok=True)
  tensors = {hf: np.ascontiguousarray(array).astype(dtype)
             for _, _, hf, _, array in _per_tensor(cfg, canonical)}
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, directory / "model.safetensors")
  else:
    weight_map = {}
    for s, part in enumerate(np.array_split(names, shards)):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      save_file({n: tensors[n] for n in part}, directory / file)
      weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
  config = dict(
      architectures=[arch], hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_context, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
      tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
      bos_token_id=1, eos_token_id=2, torch_dtype="float32")
  config.update(config_extra)
  (directory / "config.json").write_text(json.dumps(config))
  return directory


def test_safetensors_llama_round_trip(tmp_path):
  cfg = _config()
  want = _canonical(cfg)
  got_cfg, got = load_safetensors(_write_hf(tmp_path / "llama", cfg, want))
  assert got_cfg == dataclasses.replace(cfg, name="llama")
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_safetensors_sharded_bf16_llama31(tmp_path):
  cfg = _config(rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 8192))
  want = _canonical(cfg)
  directory = _write_hf(
      tmp_path / "llama31", cfg, want, shards=3, dtype=ml_dtypes.bfloat16,
      eos_token_id=[2, 7],
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0,
                        original_max_position_embeddings=8192))
  got_cfg, got = load_safetensors(directory)
  assert got_cfg == dataclasses.replace(cfg, name="llama31",
                                        eos_token_ids=(2, 7))
  for name in want:
    rounded = want[name].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got[name], rounded, err_msg=name)


def test_safetensors_qwen2_tied_with_biases(tmp_path):
  cfg = _config(qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
                norm_eps=1e-6, rope_linear_factor=2.0)
  want = _canonical(cfg)
  directory = _write_hf(tmp_path / "qwen", cfg, want, arch="Qwen2ForCausalLM",
                        use_sliding_window=False, sliding_window=32768,
                        rope_scaling=dict(type="linear", factor=2.0))
  got_cfg, got = load_safetensors(directory, dtype=np.float16)
  assert got_cfg == dataclasses.replace(cfg, name="qwen")
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4)


def test_sliding_window_becomes_max_context_and_longer_ones_are_refused(
    tmp_path, caplog):
  """Sliding-window attention is not implemented, so the model runs only
  within its window: a longer full-cache context is an error, not a silent
  run with attention the model never had."""
  from lmcache_jax import models
  from lmcache_jax.engine import generate
  cfg = _config()
  assert cfg.max_context == 256
  directory = _write_hf(tmp_path / "mistral", cfg, _canonical(cfg),
                        arch="MistralForCausalLM", sliding_window=64)
  with caplog.at_level(logging.WARNING):
    lm = models.load(str(directory))
  assert lm.cfg.max_context == 64
  assert ("sliding_window=64 is not supported, so max_context is the window, "
          "not 256") in caplog.text
  with pytest.raises(ValueError, match="a context of 65 tokens exceeds the "
                     "model's maximum of 64"):
    generate(lm, [[3] * 61], max_new_tokens=4)
  _write_gguf(tmp_path / "m.gguf", cfg, _canonical(cfg), sliding_window=64)
  assert load_gguf(tmp_path / "m.gguf")[0].max_context == 64
  _write_gguf(tmp_path / "w.gguf", cfg, _canonical(cfg), sliding_window=4096)
  assert load_gguf(tmp_path / "w.gguf")[0].max_context == 256
  bad = _write_hf(tmp_path / "bad", cfg, _canonical(cfg),
                  arch="MistralForCausalLM", sliding_window=0)
  with pytest.raises(ValueError, match="sliding_window must be a positive "
                     "int, got 0"):
    load_safetensors(bad)


def test_safetensors_unknown_architecture(tmp_path):
  cfg = _config()
  directory = _write_hf(tmp_path / "gpt", cfg, _canonical(cfg),
                        arch="GPT2LMHeadModel")
  with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported; "
                     r"supported: \['LlamaForCausalLM', 'MistralForCausalLM', "
                     r"'Qwen2ForCausalLM'\]"):
    load_safetensors(directory)


def test_safetensors_shape_mismatch(tmp_path):
  cfg = _config()
  directory = _write_hf(tmp_path / "bad", cfg, _canonical(cfg),
                        intermediate_size=96)
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight'"
                     r" has shape \(128, 64\), expected \(96, 64\)"):
    load_safetensors(directory)


def test_safetensors_missing_pieces(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    load_safetensors(tmp_path)
  cfg = _config()
  directory = _write_hf(tmp_path / "sharded", cfg, _canonical(cfg), shards=2)
  shard = directory / "model-00002-of-00002.safetensors"
  shard.write_text("not a safetensors file")
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is "
                     "not a readable safetensors file"):
    load_safetensors(directory)
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="shard model-00002-of-00002"):
    load_safetensors(directory)


def test_safetensors_unsupported_rope_scaling(tmp_path):
  cfg = _config()
  directory = _write_hf(tmp_path / "yarn", cfg, _canonical(cfg),
                        rope_scaling=dict(rope_type="yarn", factor=4.0))
  with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not "
                     "supported; supported: 'default', 'linear', 'llama3'"):
    load_safetensors(directory)


# -- presets -----------------------------------------------------------------

def test_presets_are_consistent():
  for name, cfg in PRESETS.items():
    assert cfg.name == name
    assert cfg.max_context >= 256
  smol = get_preset("smollm2-135m")
  assert (smol.num_layers, smol.hidden_size, smol.num_heads,
          smol.num_kv_heads, smol.head_dim) == (30, 576, 9, 3, 64)
  assert get_preset("llama3-8b").rope_scaling is None
  assert get_preset("llama3.1-8b").rope_scaling == (8.0, 1.0, 4.0, 8192)


def test_a_preset_name_means_the_preset_even_beside_a_folder_of_that_name(
    tmp_path, monkeypatch, caplog):
  from lmcache_jax import models
  cfg = _config(num_layers=1)
  _write_hf(tmp_path / "tiny", cfg, _canonical(cfg))
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.WARNING):
    preset = models.load("tiny")
  assert preset.source == "random:tiny" and preset.cfg == get_preset("tiny")
  assert "give the file or folder of that name as ./tiny" in caplog.text
  assert models.load("./tiny").cfg == dataclasses.replace(cfg, name="tiny")
  assert (models.is_path("tiny"), models.is_path("random:tiny"),
          models.is_path("./tiny"), models.is_path("x.gguf")) == (
              False, False, True, True)
  with pytest.raises(ValueError, match="'tiny2' is neither a model preset "
                     r"\(smollm2-135m, .*\), a .gguf file nor"):
    models.load("tiny2")


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match="unknown model preset 'gpt-5'; known "
                     "presets: smollm2-135m, llama2-7b, .*, tiny"):
    get_preset("gpt-5")


def test_random_weights():
  cfg = get_preset("tiny")
  weights = random_weights(cfg, seed=3, dtype=ml_dtypes.bfloat16)
  check_weights(cfg, weights, "random_weights")
  assert weights["layers.q"].dtype == ml_dtypes.bfloat16
  assert np.all(weights["final_norm"] == 1)
  again = random_weights(cfg, seed=3, dtype=ml_dtypes.bfloat16)
  np.testing.assert_array_equal(weights["embed"], again["embed"])
  with pytest.raises(ValueError, match="llama2-13b.*on the device with "
                     "lmcache_jax.models.llama.random_weights"):
    random_weights(get_preset("llama2-13b"))


# -- the real SmolLM2-135M GGUF ----------------------------------------------

def _smollm2_gguf():
  try:
    return default_gguf_path()
  except fetch.FetchError as e:
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.mark.real_model
def test_real_smollm2_gguf():
  path = _smollm2_gguf()
  cfg, weights = load_gguf(path)
  assert dataclasses.replace(cfg, name="smollm2-135m") == PRESETS[
      "smollm2-135m"]
  assert all(np.isfinite(a).all() for a in weights.values())
  # Only correctly un-permuted Q/K make the model sure of the reply: its
  # mean NLL is 0.11993 nats per token (float64 reference, measured by this
  # test's computation), ~1.9 with the converter's rows kept.
  tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
  ids = {t: i for i, t in enumerate(tokens)}
  question = ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital",
              "Ġof", "ĠFrance", "?", "<|im_end|>", "Ċ", "<|im_start|>", "ass",
              "istant", "Ċ"]
  reply = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
  seq = [ids[t] for t in question + reply]
  logits = reference_logits(cfg, weights, seq)[len(question) - 1:-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(reply)), seq[len(question):]].mean()
  assert nll == pytest.approx(0.11993, rel=1e-3)


def test_safetensors_directory_with_tokenizer_json(tmp_path):
  """A Hugging Face directory brings its own tokenizer and end-of-turn ids."""
  import json as _json
  import tokenizers
  from safetensors.numpy import save_file
  from lmcache_jax import models
  from lmcache_jax.models.presets import get_preset, random_weights

  cfg = get_preset("tiny")
  weights = random_weights(cfg, seed=0)
  tensors = {"model.embed_tokens.weight": weights["embed"],
             "model.norm.weight": weights["final_norm"]}
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = weights["lm_head"].T.copy()
  hf = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
  proj = {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
          "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
  for i in range(cfg.num_layers):
    for ours, theirs in hf.items():
      tensors[f"model.layers.{i}.{theirs}.weight"] = weights[f"layers.{ours}"][i]
    for ours, theirs in proj.items():
      tensors[f"model.layers.{i}.{theirs}.weight"] = weights[f"layers.{ours}"][i].T.copy()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(_json.dumps({
      "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_context,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings}))
  vocab = {chr(ord("a") + i): i for i in range(26)}
  vocab["<eos>"] = 26
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(_json.dumps(
      {"eos_token": "<eos>", "chat_template": "{{ messages[0]['content'] }}"}))
  lm = models.load(str(tmp_path))
  assert lm.tokenizer.encode("abc") == [0, 1, 2]
  assert lm.cfg.eos_token_ids == (26,)
  assert lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
