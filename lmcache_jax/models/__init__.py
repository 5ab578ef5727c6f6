"""Llama-family models: the network, weights, presets, loaders and tokenizer."""

from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.loader import (DEFAULT_MODEL, default_dtype, is_path,
                                       known_models, load)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelConfig", "default_dtype",
           "is_path", "known_models", "load"]
