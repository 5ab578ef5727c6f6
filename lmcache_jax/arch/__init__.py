"""What a model architecture is, before any weights: its config and RoPE."""

from lmcache_jax.arch.config import ModelConfig

__all__ = ["ModelConfig"]
