"""Shared fixtures: tiny random configs and weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

from lmcache_jax.arch.config import ModelConfig  # noqa: E402
from lmcache_jax.models.weights import expected_shapes  # noqa: E402


def tiny_config(**overrides) -> ModelConfig:
  fields = dict(name="tiny-test", vocab_size=97, hidden_size=48,
                intermediate_size=80, num_layers=3, num_heads=6,
                num_kv_heads=2, head_dim=8, max_context=128,
                rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
                eos_token_ids=(1,))
  fields.update(overrides)
  return ModelConfig(**fields)


def tiny_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights scaled so activations stay O(1) through the layers."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in expected_shapes(cfg).items():
    if name.endswith("norm"):
      weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif name.endswith("bias"):
      weights[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = shape[-2]
      weights[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(
          np.float32)
  return weights


class ByteTokenizer:
  """One token per UTF-8 byte, for tiny models with a 256-entry vocabulary:
  lengths are exact and easy to reason about. No chat template, and no BOS
  or special tokens (tasks cue with plain text)."""
  chat_template = None

  def encode(self, text: str, add_bos: bool | None = None,
             special: bool = True) -> list[int]:
    del add_bos, special
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special: bool = False) -> str:
    del skip_special
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops the programs a test module compiled once it is done. Every program
  compiled on the CPU holds memory maps that its process keeps, and a worker
  running a share of this suite (whose tests compile many shapes on purpose)
  would otherwise reach the kernel's vm.max_map_count (65,530), where XLA fails
  with 'LLVM compilation error: Cannot allocate memory' and segfaults. Cleared
  after each module, a worker peaks at its largest module's maps."""
  yield
  jax.clear_caches()


@pytest.fixture
def tiny():
  cfg = tiny_config()
  return cfg, tiny_weights(cfg)


@pytest.fixture(scope="session")
def real_lm():
  """The real SmolLM2-135M-Instruct in float32, loaded once per test session."""
  import jax.numpy as jnp
  from lmcache_jax import models
  return models.load("smollm2-135m", jnp.float32)
