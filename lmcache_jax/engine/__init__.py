"""Jitted prefill / decode steps, sampling and the generation loop."""

from lmcache_jax.engine.generate import Generation, decode, generate
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling

__all__ = ["Generation", "decode", "generate", "prefill", "Sampling"]
