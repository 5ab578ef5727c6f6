"""Llama-family models: architecture, presets, loaders and tokenizer.

``load`` and ``LoadedModel`` are imported on first use: they depend on the
engine, which depends on the cache, which needs ``models.config``; importing
them eagerly here would make ``import lmcache_jax.cache`` circular.
"""

import importlib

from lmcache_jax.models.config import ModelConfig

_LAZY = {
    "LoadedModel": "lmcache_jax.engine.loaded",
    "DEFAULT_MODEL": "lmcache_jax.models.loader",
    "default_dtype": "lmcache_jax.models.loader",
    "known_models": "lmcache_jax.models.loader",
    "load": "lmcache_jax.models.loader",
}

__all__ = ["ModelConfig", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'lmcache_jax.models' has no attribute {name!r}")
