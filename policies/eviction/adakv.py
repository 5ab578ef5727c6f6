"""``adakv``: redistribute a layer's budget across its heads (wraps a scorer).

Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation": instead of ``budget`` tokens in every head, a layer keeps its
``heads * budget`` highest-scored tokens wherever they are, so heads with
concentrated attention give slots to heads with diffuse attention. Each head
keeps at least ``alpha * budget`` (the paper's safeguard, 0.2), plus its
protected tokens. The inner scorer (``snapkv`` by default, as in the paper) is
a scoring policy object, ``AdaKV(budget, inner=SnapKV(budget, window=32))``;
from a config or the command line, a registered name or call string
(``adakv(inner='snapkv(window=32)')``). Its budget becomes adakv's. A dense cache
needs a ceiling per head: at most ``head_cap * budget`` (default 2), which sets
the slots allocated. Decode-time eviction (``evict_every``) is the inner
scorer's unless given.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lmcache_jax.cache import positions as pos_lib
from lmcache_jax.cache.eviction import EvictionPolicy
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from policies.registry import EVICTION


@EVICTION.register("adakv")
@dataclasses.dataclass(frozen=True)
class AdaKV(EvictionPolicy):
  """Per-layer top-k across heads of an inner scorer (safeguard alpha per head)."""
  name = "adakv"
  inner: EvictionPolicy | str = "snapkv"
  alpha: float = 0.2
  head_cap: float = 2.0
  evict_every: int | None = None   # None: the inner scorer's
  _scorer: EvictionPolicy = dataclasses.field(default=None, init=False,
                                              repr=False, compare=False)

  def __post_init__(self):
    scorer = (EVICTION.make(self.inner, budget=self.budget)
              if isinstance(self.inner, str)
              else dataclasses.replace(self.inner, budget=self.budget))
    if not isinstance(scorer, EvictionPolicy) or isinstance(scorer, AdaKV):
      raise ValueError(f"{self.name}: inner must be a scoring eviction policy "
                       f"other than adakv, got {self.inner!r}")
    if type(scorer).layer_budgets is not EvictionPolicy.layer_budgets:
      raise ValueError(f"{self.name}: inner {self.inner!r} sets per-layer "
                       f"budgets; adakv redistributes within uniform layers")
    object.__setattr__(self, "_scorer", scorer)
    # What is observed and protected is the inner scorer's (instance
    # attributes shadow the base's class-level defaults).
    for attr in ("observe", "uses_attention_mass", "sinks", "window",
                 "reposition", "only_sinks_move"):
      object.__setattr__(self, attr, getattr(scorer, attr))
    if self.evict_every is None:
      object.__setattr__(self, "evict_every", scorer.evict_every)
    super().__post_init__()
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"{self.name}: alpha must be in [0, 1], got {self.alpha!r}")
    if not self.head_cap >= 1.0:
      raise ValueError(f"{self.name}: head_cap must be >= 1, got "
                       f"{self.head_cap!r}")

  @property
  def max_row_slots(self) -> int:
    return math.floor(self.head_cap * self.budget)

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    return self._scorer.score(cache, mass, step)

  def keep(self, cache: KVCache) -> jax.Array:
    layers, batch, heads, slots = cache.positions.shape
    live = cache.positions >= 0
    prio = self.priority(cache)
    head_rank = pos_lib.rank_descending(prio, cache.positions)
    floor = max(math.ceil(self.alpha * self.budget), self.sinks + self.window)
    eligible = head_rank < self.max_row_slots
    prio = jnp.where(head_rank < floor, jnp.inf,
                     jnp.where(eligible, prio, -jnp.inf))
    flat = lambda x: x.reshape(layers, batch, 1, heads * slots)
    layer_rank = pos_lib.rank_descending(flat(prio), flat(cache.positions))
    kept = layer_rank.reshape(cache.positions.shape) < heads * self.budget
    return live & eligible & kept
