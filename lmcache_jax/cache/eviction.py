"""The eviction mechanism, written once: budgets, protection, selection, slot reuse.

A policy subclasses ``EvictionPolicy`` and supplies ``score`` (a new per-slot
score state from the cache and this step's attention mass); the base does the
rest inside ``jit`` with fixed shapes:

* ``plan`` puts new tokens into free slots and says which queries vote
  (``observe``: all real queries, the last ``window``, or the last one).
* ``update`` refreshes the score state of the sequences that took tokens, then
  keeps, per (layer, sequence, kv head), the ``budget`` live slots of highest
  priority — protected slots (the first ``sinks`` positions, the ``window``
  most recent, and the newest token, which no forward pass evicts) first,
  then by score, ties to the newer token — and frees the rest (position -1),
  so the next tokens reuse them.

Three moments (see ``engine.prefill`` and ``engine.decode``):

* A prompt that fits in the cache is prefilled without evicting
  (``deferring``) and compressed once at the end (``after_prefill``) —
  SnapKV's "compress after prefill". The queries that vote are those of the
  prompt (``Span``), not of one chunk: an observation window of the prompt's
  last ``window`` queries accumulates its votes across chunks, whatever the
  chunking, and is scored once, at the end.
* A longer prompt streams: it evicts to the budget after every forward pass
  (StreamingLLM), and each pass's own queries vote.
* Decoding, and any token fed after the compression, runs under
  ``decoding()``, whose eviction is the policy's ``evict_every``: 0 = never
  (compress once, keep every new token: kvpress's default), 1 = every step
  (hold the budget), N = when N tokens beyond the budget have accumulated,
  i.e. every N steps (kvpress's DecodingPress). Whatever the mode, a row
  with no free slot for another step evicts to its budget rather than drop
  a token.

Capacity is the largest per-row budget plus room for one forward pass or the
tokens decoded between two evictions, whichever is larger
(``cache_capacity``).

Per-layer budgets come from ``layer_budgets`` (PyramidKV); selection across a
layer's heads from ``keep`` (AdaKV). With ``reposition`` positions inside
the cache are re-assigned: a policy evicting oldest first re-rotates its sink
keys, each once from its origin (``cache.positions``).
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
from lmcache_jax.cache.step import Span, Step, token_positions
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.arch.rope import inverse_frequencies

OBSERVE = ("all", "window", "last")


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
  """Keeps at most ``budget`` tokens per (layer, sequence, kv head).

  Subclasses set ``name``, ``observe`` and ``score``; those that protect
  tokens, re-assign positions or evict while decoding declare ``sinks``,
  ``window``, ``reposition`` or ``evict_every`` as fields (parameters), which
  shadow the defaults below.
  """
  name: ClassVar[str] = ""
  # Plain class attributes, not fields: a subclass that declares one as a
  # field makes it a parameter, placed after ``budget``.
  observe = "all"
  uses_attention_mass = True   # False: attention skips computing ``mass``
  sinks = 0
  window = 0
  evict_every = 0              # while decoding: 0 never, 1 every step, N
  reposition = False
  only_sinks_move = False      # True: eviction never shifts a non-sink key
                               # (required by reposition)

  budget: int
  # Set by ``bind`` / ``deferring`` / ``decoding`` / ``after_prefill``, not by
  # users (not parameters).
  _inv_freq: tuple[float, ...] = dataclasses.field(default=(), init=False,
                                                   repr=False)
  _defer: bool = dataclasses.field(default=False, init=False, repr=False)
  _decoding: bool = dataclasses.field(default=False, init=False, repr=False)
  _keep_newest: bool = dataclasses.field(default=True, init=False, repr=False)

  def __post_init__(self):
    for field in ("budget", "sinks", "window", "evict_every"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{self.name}: {field} must be a whole number"
                         f"{'' if field == 'evict_every' else ' of tokens'}, "
                         f"got {value!r}")
    if self.budget <= 0:
      raise ValueError(f"{self.name}: budget must be a positive number of "
                       f"tokens, got {self.budget}")
    if self.sinks < 0 or self.window < 0:
      raise ValueError(f"{self.name}: sinks and window must be >= 0, got "
                       f"sinks={self.sinks}, window={self.window}")
    if self.evict_every < 0:
      raise ValueError(f"{self.name}: evict_every must be 0 (never evict "
                       f"while decoding), 1 (every step) or N > 1 (every N "
                       f"steps), got {self.evict_every}")
    if self.sinks + max(self.window, 1) > self.min_budget:
      raise ValueError(
          f"{self.name}: sinks ({self.sinks}) + window ({self.window}), with "
          f"at least the newest token, exceed the budget ({self.min_budget} "
          f"tokens in the smallest row); protect fewer tokens or raise the "
          f"budget")
    if self.reposition and not self.only_sinks_move:
      raise ValueError(
          f"{self.name}: re-assigning positions (reposition=True) rotates only "
          f"the sink tokens, so the policy must evict its oldest tokens first "
          f"(only_sinks_move); use reposition=False")
    if self.observe not in OBSERVE:
      raise ValueError(f"{self.name}: observe must be one of {OBSERVE}")

  # ----- what subclasses override -------------------------------------------

  def score(self, cache: KVCache, mass: jax.Array,
            step: Step | None) -> jax.Array:
    """New score state [L, B, K, S] (higher = keep) after a forward pass.

    ``cache`` holds this step's keys (their slots' old score reset to 0);
    ``mass`` [L, B, K, S] is the attention each slot received from the
    queries ``observe`` selects (None if ``uses_attention_mass`` is False).
    A policy observing a ``window`` is also scored once after a deferred
    prefill, with ``mass`` the votes of the prompt's window, ``step`` None.
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
    """[L, B, K, S] bool: sink tokens, the recent window and (after a forward
    pass, not in ``after_prefill``'s compression) the newest token."""
    pos = cache.positions
    window = max(self.window, int(self._keep_newest))
    recent = pos >= (cache.lengths - window)[None, :, None, None]
    return (pos >= 0) & ((pos < self.sinks) | recent)

  def priority(self, cache: KVCache) -> jax.Array:
    """Scores with protected slots at +inf and empty slots at -inf."""
    prio = jnp.where(self.protected(cache), jnp.inf, cache.scores)
    return jnp.where(cache.positions >= 0, prio, -jnp.inf)

  @property
  def decode_mode(self) -> str:
    """How this policy evicts while decoding, in words (stated in results)."""
    if self.evict_every == 0:
      return "never"
    if self.evict_every == 1:
      return "every step"
    return f"every {self.evict_every} steps"

  def cache_capacity(self, context: int, chunk: int,
                     new_tokens: int = 0) -> int:
    """The largest row budget plus room for one forward pass of ``chunk``
    tokens or for the tokens decoded between two evictions (``new_tokens``
    when ``evict_every`` is 0, else ``evict_every``), capped at ``context``."""
    if self.budget > context:
      raise ValueError(f"{self.name}: budget {self.budget} is larger than the "
                       f"context ({context} tokens); use at most {context}, or "
                       f"the full policy")
    if chunk <= 0:
      raise ValueError(f"chunk must be positive, got {chunk}")
    if new_tokens < 0:
      raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    between = new_tokens if self.evict_every == 0 else self.evict_every
    return min(context, self.max_row_slots + max(chunk, between))

  def plan(self, cache: KVCache, num_new: jax.Array, num_tokens: int,
           prompt: Span | None = None) -> Step:
    """Slots for the new tokens, and the queries that vote: those of the
    prompt being deferred (``prompt``), else of this step alone."""
    positions = token_positions(cache, num_new, num_tokens)
    spans_steps = prompt is not None and self._defer
    if not spans_steps:
      prompt = Span(cache.lengths, cache.lengths + num_new)
    if self.observe == "window":
      first = jnp.maximum(prompt.start, prompt.end - self.window)
    elif self.observe == "last":
      first = prompt.end - 1
    else:
      first = prompt.start
    weights = (positions >= 0) & (positions >= first[:, None])
    carry = None
    if spans_steps and self.observe == "window":
      carry = positions[:, 0] > first   # earlier steps held voters
    return Step(positions=positions,
                rope_positions=jnp.maximum(positions, 0),
                slots=first_free_slots(cache, num_new, num_tokens),
                query_weights=weights.astype(jnp.float32),
                carry_votes=carry)

  def update(self, cache: KVCache, mass: jax.Array, step: Step) -> KVCache:
    active = jnp.any(step.positions >= 0, axis=1)[None, :, None, None]
    if self._defer and self.observe == "window":
      # The window's raw votes, summed over the prompt's chunks; scored once
      # by ``after_prefill``.
      if step.carry_votes is not None:
        carried = step.carry_votes[None, :, None, None]
        mass = mass + jnp.where(carried, cache.scores, 0.0)
      scores = jnp.where(active, mass, cache.scores)
      return cache.replace(scores=scores.astype(jnp.float32))
    scores = jnp.where(active, self.score(cache, mass, step), cache.scores)
    cache = cache.replace(scores=scores.astype(jnp.float32))
    if self._defer:
      return cache
    return self.evict(cache, self._due(cache) if self._decoding else None)

  def _due(self, cache: KVCache) -> jax.Array | None:
    """[B] bool: the sequences that evict after a decoding step (None: all).

    ``evict_every`` N > 1 counts the tokens held beyond the budget (in the
    layer holding most): a compression brings a sequence back to its budget,
    so that count reaches N every N steps. A sequence with a row left without
    a free slot evicts whatever the mode, rather than drop the next token.
    """
    if self.evict_every == 1:
      return None
    live = cache.positions >= 0
    due = jnp.any(jnp.all(live, axis=-1), axis=(0, 2))
    if self.evict_every > 1:
      heads = cache.num_kv_heads
      budgets = jnp.asarray(self.layer_budgets(cache.num_layers)) * heads
      beyond = jnp.sum(live, axis=(2, 3)) - budgets[:, None]
      due = due | (jnp.max(beyond, axis=0) >= heads * self.evict_every)
    return due

  def evict(self, cache: KVCache, due: jax.Array | None = None) -> KVCache:
    """Frees every live slot that ``keep`` rejects in the sequences ``due``
    [B] (all when None), re-rotating the sink keys if asked."""
    evicted = (cache.positions >= 0) & ~self.keep(cache)
    if due is not None:
      evicted = evicted & due[None, :, None, None]
    if self.reposition:
      cache = self._reposition(cache, evicted)
    return cache.replace(
        positions=jnp.where(evicted, EMPTY, cache.positions),
        scores=jnp.where(evicted, 0.0, cache.scores))

  def _reposition(self, cache: KVCache, evicted: jax.Array) -> KVCache:
    """Moves each sink key forward by the evicted tokens newer than it (the
    only keys that move: see ``cache.positions``)."""
    if not self._inv_freq:
      raise ValueError(
          f"{self.name} re-assigns positions and needs the model's RoPE "
          f"frequencies: use policy.bind(cfg) (engine.prefill, engine.decode "
          f"and experiments.run bind it for you)")
    cache = self.prepare(cache)
    keys, origins = pos_lib.shift_sinks(
        cache.keys, cache.positions, cache.sink_origins,
        pos_lib.newer_evicted(cache.positions, evicted),
        np.asarray(self._inv_freq, np.float32))
    return cache.replace(keys=keys, sink_origins=origins)

  def prepare(self, cache: KVCache) -> KVCache:
    """The cache with the origins a re-assigning policy rotates its sinks
    from (``cache.positions``); others need nothing."""
    if not self.reposition:
      return cache
    if not isinstance(cache.keys, jax.Array):
      self._check_quantized_shift(cache.keys)
    origins = cache.sink_origins
    if origins is None:
      return cache.replace(sink_origins=pos_lib.unmoved_origins(
          cache.keys, cache.positions, self.sinks))
    if origins.shift.shape[-1] != self.sinks:
      raise ValueError(
          f"{self.name}: this cache's sinks were re-assigned by a policy "
          f"with {origins.shift.shape[-1]} sinks; continue it with "
          f"sinks={origins.shift.shape[-1]}, not {self.sinks}")
    return cache

  def _check_quantized_shift(self, keys) -> None:
    """Quantized keys are re-rotated through their exact copies only: every
    sink must have one, held in the cache dtype."""
    if keys.sinks < self.sinks:
      raise ValueError(
          f"{self.name} re-assigns positions, which in a quantized cache "
          f"re-rotates the full-precision copies of its sinks: it needs a "
          f"quant plan keeping at least its {self.sinks} sinks exact (plan "
          f"sinks: {keys.sinks}); raise the plan's sinks or use "
          f"reposition=False")
    if keys.exact_scale is not None:
      raise ValueError(
          f"{self.name} re-assigns positions by rewriting the sink copies, "
          f"which must be held in the cache dtype, not as int8 codes "
          f"(copy_bits=8): use copy_bits=16 or reposition=False")

  def bind(self, cfg: ModelConfig) -> EvictionPolicy:
    """This policy for a model: re-rotation needs its RoPE frequencies."""
    if not self.reposition:
      return self
    return self._with(_inv_freq=tuple(float(f) for f in inverse_frequencies(cfg)))

  def deferring(self) -> EvictionPolicy:
    """This policy scoring without evicting, for a prompt that fits the cache
    (a decoding policy never defers: tokens fed under it are decode tokens)."""
    return self if self._decoding else self._with(_defer=True)

  def decoding(self) -> EvictionPolicy:
    """This policy for decoding: it evicts as ``evict_every`` says."""
    return self._with(_decoding=True, _defer=False)

  def after_prefill(self, cache: KVCache) -> KVCache:
    """Compresses a deferred prefill down to the budget, protecting what the
    policy declares (sinks, window) as kvpress does; a no-op when decoding."""
    if self._decoding:
      return cache
    return _compress_jit(cache, policy=self._with(_defer=False,
                                                  _keep_newest=False))

  def _with(self, **fields) -> EvictionPolicy:
    new = copy.copy(self)
    for key, value in fields.items():
      object.__setattr__(new, key, value)
    return new


@functools.partial(jax.jit, static_argnames=("policy",),
                   donate_argnames=("cache",))
def _compress_jit(cache: KVCache, *, policy: EvictionPolicy) -> KVCache:
  if policy.observe == "window":   # the score state holds the window's votes
    scores = policy.score(cache, cache.scores, None)
    cache = cache.replace(scores=scores.astype(jnp.float32))
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
