"""Named configs with the real shapes of well-known models, and random weights.

Presets let speed and memory work run at true shapes without a checkpoint;
``tiny`` is for tests. Token ids are those of the checkpoints named in each
comment.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.weights import expected_shapes

# Host memory above which random_weights refuses and points to the device path.
_MAX_HOST_BYTES = 4 << 30


def _llama2(name: str, hidden: int, mlp: int, layers: int, heads: int
            ) -> ModelConfig:
  return ModelConfig(name=name, vocab_size=32000, hidden_size=hidden,
                     intermediate_size=mlp, num_layers=layers, num_heads=heads,
                     num_kv_heads=heads, head_dim=128, max_context=4096,
                     rope_theta=10000.0, norm_eps=1e-5, bos_token_id=1,
                     eos_token_ids=(2,))


def _llama3(name: str, **overrides: Any) -> ModelConfig:
  fields = dict(name=name, vocab_size=128256, hidden_size=4096,
                intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, max_context=8192,
                rope_theta=500000.0, norm_eps=1e-5, bos_token_id=128000,
                eos_token_ids=(128001, 128009))  # <|end_of_text|>, <|eot_id|>
  fields.update(overrides)
  return ModelConfig(**fields)


PRESETS: dict[str, ModelConfig] = {
    # SmolLM2-135M-Instruct, the project's default model (its GGUF's ids:
    # <|im_start|> = 1, <|im_end|> = 2).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, max_context=8192, rope_theta=100000.0, norm_eps=1e-5,
        tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "llama2-7b": _llama2("llama2-7b", 4096, 11008, 32, 32),
    "llama2-13b": _llama2("llama2-13b", 5120, 13824, 40, 40),
    # Meta-Llama-3-8B: no rope scaling.
    "llama3-8b": _llama3("llama3-8b"),
    # Llama-3.1-8B: 128K context through Llama-3 frequency scaling.
    "llama3.1-8b": _llama3(
        "llama3.1-8b", max_context=131072,
        rope_scaling=(8.0, 1.0, 4.0, 8192),
        eos_token_ids=(128001, 128008, 128009)),  # + <|eom_id|>
    # Mistral-7B-v0.3: full attention (v0.1's 4096-token sliding window is
    # gone), rope theta 1e6, 32768-token vocabulary.
    "mistral-7b": ModelConfig(
        name="mistral-7b", vocab_size=32768, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_context=32768, rope_theta=1000000.0, norm_eps=1e-5,
        bos_token_id=1, eos_token_ids=(2,)),
    # Qwen2-0.5B(-Instruct): biased q/k/v, tied embeddings, 32K context;
    # <|endoftext|> = 151643 (also config.json's bos, though Qwen2 prepends
    # none), <|im_end|> = 151645.
    "qwen2-0.5b": ModelConfig(
        name="qwen2-0.5b", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        head_dim=64, max_context=32768, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=True, qkv_bias=True, bos_token_id=151643,
        eos_token_ids=(151643, 151645)),
    # For tests: every feature of the layout at a size that runs in seconds.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_context=256, bos_token_id=1, eos_token_ids=(2,)),
}


def get_preset(name: str) -> ModelConfig:
  """The preset called ``name``; an unknown name lists the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: "
                     f"{', '.join(PRESETS)}")
  return PRESETS[name]


def random_weights(cfg: ModelConfig, seed: int = 0, dtype: Any = np.float32
                   ) -> dict[str, np.ndarray]:
  """Canonical numpy weights for runs where the values do not matter.

  Matrices and biases ~ N(0, 0.02), norms at 1. Drawn on the host, so meant
  for small models: above 4 GiB it raises and names the on-device
  alternative, ``lmcache_jax.models.llama.random_weights``.
  """
  dtype = np.dtype(dtype)
  shapes = expected_shapes(cfg)
  size = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
  if size > _MAX_HOST_BYTES:
    raise ValueError(
        f"random weights of {cfg.name!r} take {size / 2**30:.1f} GiB of host "
        f"memory in {dtype.name} (limit {_MAX_HOST_BYTES >> 30} GiB); draw "
        "them on the device with lmcache_jax.models.llama.random_weights")
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in shapes.items():
    if name.endswith("norm"):
      weights[name] = np.ones(shape, dtype)
    else:
      draw = rng.standard_normal(shape, dtype=np.float32)
      draw *= 0.02
      weights[name] = draw.astype(dtype, copy=False)
  return weights
