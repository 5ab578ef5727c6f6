"""``snapkv``: the prompt's last queries vote for the tokens to keep.

Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation": after prefill, the last ``window`` queries (the observation
window, 32 in the paper's runs) attend over the prompt; each head sums their
attention per token, smooths it by pooling over neighbouring tokens (kernel 5,
average, as in the reference code; 7 and max pooling also appear), keeps its
top tokens, and always keeps the window itself. In this framework a prompt that
fits the cache is compressed once after prefill (``engine.prefill``), the
window being the prompt's last ``window`` queries whatever the prefill
chunking; a streamed prompt evicts after every forward pass, with that pass's
last ``window`` queries voting. As in the paper (and kvpress), decoding keeps
every new token (``evict_every=0``); with ``evict_every=N`` it compresses
every N steps, the current step's query voting.
"""

from __future__ import annotations

import dataclasses

import jax

from lmcache_jax.cache.eviction import EvictionPolicy, in_position_order, pool_1d
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION

POOLS = ("avg", "max")


@EVICTION.register("snapkv")
@dataclasses.dataclass(frozen=True)
class SnapKV(EvictionPolicy):
  """Observation-window votes, pooled, top-k per head; the window is kept."""
  name = "snapkv"
  observe = "window"
  window: int = 32
  kernel: int = 5
  pool: str = "avg"
  evict_every: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"{self.name}: kernel must be a positive odd number, "
                       f"got {self.kernel!r}")
    if self.pool not in POOLS:
      raise ValueError(f"{self.name}: pool must be one of {POOLS}, got "
                       f"{self.pool!r}")

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    del step
    return in_position_order(lambda x: pool_1d(x, self.kernel, self.pool),
                             mass, cache.positions)
