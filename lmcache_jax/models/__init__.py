"""Llama-family models: architecture, presets, loaders and tokenizer."""

from lmcache_jax.models.config import ModelConfig
from lmcache_jax.engine.loaded import LoadedModel
from lmcache_jax.models.loader import DEFAULT_MODEL, default_dtype, known_models, load

__all__ = ["LoadedModel", "ModelConfig", "DEFAULT_MODEL", "default_dtype", "known_models", "load"]
