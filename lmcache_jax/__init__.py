"""lmcache_jax: the KV cache of an LLM as managed state — quantized, pruned,
tiered across HBM, host memory and disk, and reused across requests."""

__version__ = "0.1.0"
