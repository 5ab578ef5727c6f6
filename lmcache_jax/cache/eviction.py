"""The eviction mechanism, written once: budgets, protection, selection, slot reuse.

A policy subclasses ``EvictionPolicy`` and supplies ``score`` (a new per-slot
score state from the cache and this step's attention mass); the base does the
rest inside ``jit`` with fixed shapes:

* ``plan`` puts new tokens into free slots and says which queries vote
  (``observe``: all real queries, the last ``window`` of the step, or the last).
* ``update`` refreshes the score state of the sequences that took tokens, then
  keeps, per (layer, sequence, kv head), the ``budget`` live slots of highest
  priority — protected slots (the first ``sinks`` positions and the ``window``
  most recent) first, then by score, ties to the newer token — and frees the
  rest (position -1), so the next tokens reuse them.
* Capacity is the largest per-row budget plus one chunk: room for the tokens
  of the next forward pass before they are scored.

Two moments (see ``engine.prefill``): a prompt that fits in the cache is
prefilled without evicting (``deferring``) and compressed once at the end
(``after_prefill``) — SnapKV's "compress after prefill", where the prompt's
last queries vote over all of it; a longer stream evicts after every forward
pass (StreamingLLM), and decoding always does.

Per-layer budgets come from ``layer_budgets`` (PyramidKV); selection across a
layer's heads from ``keep`` (AdaKV). With ``reposition`` the kept keys are
re-rotated so positions inside the cache are re-assigned (``cache.positions``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache import positions as pos_lib
from lmcache_jax.cache.kv_cache import EMPTY, KVCache, first_free_slots
from lmcache_jax.cache.step import Step, token_positions
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.arch.rope import inverse_frequencies

OBSERVE = ("all", "window", "last")


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
  """Keeps at most ``budget`` tokens per (layer, sequence, kv head).

  Subclasses set ``name``, ``observe`` and ``score``; those that protect
  tokens or re-assign positions declare ``sinks``, ``window`` or
  ``reposition`` as fields (parameters), which shadow the defaults below.
  """
  name: ClassVar[str] = ""
  # Plain class attributes, not fields: a subclass that declares one as a
  # field makes it a parameter, placed after ``budget``.
  observe = "all"
  uses_attention_mass = True   # False: attention skips computing ``mass``
  sinks = 0
  window = 0
  reposition = False
  only_sinks_move = False      # True: eviction never shifts a non-sink key

  budget: int
  # Set by ``bind`` / ``deferring``, not by users (not parameters).
  _inv_freq: tuple[float, ...] = dataclasses.field(default=(), init=False,
                                                   repr=False)
  _defer: bool = dataclasses.field(default=False, init=False, repr=False)

  def __post_init__(self):
    for field in ("budget", "sinks", "window"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{self.name}: {field} must be a whole number of "
                         f"tokens, got {value!r}")
    if self.budget <= 0:
      raise ValueError(f"{self.name}: budget must be a positive number of "
                       f"tokens, got {self.budget}")
    if self.sinks < 0 or self.window < 0:
      raise ValueError(f"{self.name}: sinks and window must be >= 0, got "
                       f"sinks={self.sinks}, window={self.window}")
    if self.sinks + self.window > self.min_budget:
      raise ValueError(
          f"{self.name}: sinks ({self.sinks}) + window ({self.window}) exceed "
          f"the budget ({self.min_budget} tokens in the smallest row); protect "
          f"fewer tokens or raise the budget")
    if self.observe not in OBSERVE:
      raise ValueError(f"{self.name}: observe must be one of {OBSERVE}")

  # ----- what subclasses override -------------------------------------------

  def score(self, cache: KVCache, mass: jax.Array, step: Step) -> jax.Array:
    """New score state [L, B, K, S] (higher = keep) after a forward pass.

    ``cache`` holds this step's keys (their slots' old score reset to 0);
    ``mass`` [L, B, K, S] is the attention each slot received from the
    queries ``observe`` selects (None if ``uses_attention_mass`` is False).
    """
    raise NotImplementedError(f"{type(self).__name__} must define score()")

  def layer_budgets(self, num_layers: int) -> np.ndarray:
    """Tokens kept per row in each layer [L]; uniform by default."""
    return np.full(num_layers, self.budget, np.int32)

  @property
  def min_budget(self) -> int:
    """The smallest per-row budget of any layer (protection must fit in it)."""
    return self.budget

  @property
  def max_row_slots(self) -> int:
    """The most live slots one (layer, sequence, head) row may hold."""
    return self.budget

  def keep(self, cache: KVCache) -> jax.Array:
    """[L, B, K, S] bool: live slots to keep — per row, the best ``budget``."""
    budgets = jnp.asarray(self.layer_budgets(cache.num_layers))
    rank = pos_lib.rank_descending(self.priority(cache), cache.positions)
    return (cache.positions >= 0) & (rank < budgets[:, None, None, None])

  # ----- the mechanism --------------------------------------------------------

  def protected(self, cache: KVCache) -> jax.Array:
    """[L, B, K, S] bool: sink tokens and the recent window, never evicted."""
    pos = cache.positions
    recent = pos >= (cache.lengths - self.window)[None, :, None, None]
    return (pos >= 0) & ((pos < self.sinks) | recent)

  def priority(self, cache: KVCache) -> jax.Array:
    """Scores with protected slots at +inf and empty slots at -inf."""
    prio = jnp.where(self.protected(cache), jnp.inf, cache.scores)
    return jnp.where(cache.positions >= 0, prio, -jnp.inf)

  def cache_capacity(self, context: int, chunk: int) -> int:
    if self.budget > context:
      raise ValueError(f"{self.name}: budget {self.budget} is larger than the "
                       f"context ({context} tokens); use at most {context}, or "
                       f"the full policy")
    if chunk <= 0:
      raise ValueError(f"chunk must be positive, got {chunk}")
    return min(context, self.max_row_slots + chunk)

  def plan(self, cache: KVCache, num_new: jax.Array, num_tokens: int) -> Step:
    positions = token_positions(cache, num_new, num_tokens)
    t = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    real = positions >= 0
    if self.observe == "window":
      weights = real & (t >= num_new[:, None] - self.window)
    elif self.observe == "last":
      weights = real & (t == num_new[:, None] - 1)
    else:
      weights = real
    return Step(positions=positions,
                rope_positions=jnp.maximum(positions, 0),
                slots=first_free_slots(cache, num_new, num_tokens),
                query_weights=weights.astype(jnp.float32))

  def update(self, cache: KVCache, mass: jax.Array, step: Step) -> KVCache:
    active = jnp.any(step.positions >= 0, axis=1)[None, :, None, None]
    scores = jnp.where(active, self.score(cache, mass, step), cache.scores)
    cache = cache.replace(scores=scores.astype(jnp.float32))
    return cache if self._defer else self.evict(cache)

  def evict(self, cache: KVCache) -> KVCache:
    """Frees every live slot that ``keep`` rejects (re-rotating if asked)."""
    evicted = (cache.positions >= 0) & ~self.keep(cache)
    keys = cache.keys
    if self.reposition:
      if not self._inv_freq:
        raise ValueError(
            f"{self.name} re-assigns positions and needs the model's RoPE "
            f"frequencies: use policy.bind(cfg) (engine.prefill, engine.decode "
            f"and experiments.run bind it for you)")
      shift = pos_lib.newer_evicted(cache.positions, evicted)
      inv_freq = np.asarray(self._inv_freq, np.float32)
      if isinstance(keys, jax.Array):
        keys = pos_lib.shift_keys(keys, shift, inv_freq)
      else:
        self._check_quantized_shift(keys)
        keys = pos_lib.shift_exact_copies(keys, shift, inv_freq)
    return cache.replace(
        keys=keys,
        positions=jnp.where(evicted, EMPTY, cache.positions),
        scores=jnp.where(evicted, 0.0, cache.scores))

  def _check_quantized_shift(self, keys) -> None:
    """Quantized keys are re-rotated through their exact copies only: every
    key that can move must have one, held in full precision (int8 copies
    would be rounded again at every shift, the error growing each step)."""
    if not self.only_sinks_move or keys.sinks < self.sinks:
      raise ValueError(
          f"{self.name} re-assigns positions, which in a quantized cache "
          f"re-rotates only the full-precision copies: it needs a policy that "
          f"moves only its sink tokens (attention_sink) and a quant plan "
          f"keeping at least its {self.sinks} sinks exact (plan sinks: "
          f"{keys.sinks}); raise the plan's sinks or use reposition=False")
    if keys.exact_scale is not None:
      raise ValueError(
          f"{self.name} re-assigns positions, which re-rotates the sink copies "
          f"at every eviction; int8 copies (copy_bits=8) would be rounded "
          f"again each time: use copy_bits=16 or reposition=False")

  def bind(self, cfg: ModelConfig) -> EvictionPolicy:
    """This policy for a model: re-rotation needs its RoPE frequencies."""
    if not self.reposition:
      return self
    return self._with(_inv_freq=tuple(float(f) for f in inverse_frequencies(cfg)))

  def deferring(self) -> EvictionPolicy:
    """This policy scoring without evicting, for a prompt that fits the cache."""
    return self._with(_defer=True)

  def after_prefill(self, cache: KVCache) -> KVCache:
    """Compresses a deferred prefill down to the budget."""
    return _evict_jit(cache, policy=self._with(_defer=False))

  def _with(self, **fields) -> EvictionPolicy:
    new = copy.copy(self)
    for key, value in fields.items():
      object.__setattr__(new, key, value)
    return new


@functools.partial(jax.jit, static_argnames=("policy",),
                   donate_argnames=("cache",))
def _evict_jit(cache: KVCache, *, policy: EvictionPolicy) -> KVCache:
  return policy.evict(cache)


def in_position_order(fn, x: jax.Array, positions: jax.Array) -> jax.Array:
  """Applies ``fn`` along the last axis of ``x`` with slots sorted by position.

  Slots are reused out of order, so neighbours in the text are not neighbours
  in the cache; pooling (SnapKV) must run in text order.
  """
  order = pos_lib.position_order(positions)
  out = fn(jnp.take_along_axis(x, order, axis=-1))
  return jnp.take_along_axis(out, pos_lib.inverse_permutation(order), axis=-1)


def pool_1d(x: jax.Array, kernel: int, mode: str) -> jax.Array:
  """Stride-1 'same' max or average pooling along the last axis (odd kernel)."""
  dims = (1,) * (x.ndim - 1) + (kernel,)
  strides = (1,) * x.ndim
  padding = ((0, 0),) * (x.ndim - 1) + ((kernel // 2, kernel // 2),)
  if mode == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides,
                                 padding)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides,
                               padding) / kernel
