"""What calibration policies measure, and how they split a bit budget.

``collect`` runs the model's own layers (``Block`` with ``trace``) over
calibration text one by one and keeps, per layer, the rotated queries and
the keys (before and after RoPE) and values every kv head produced.
``allocate`` picks a width from {2, 3, 4, 8} for every (layer, head)
minimising a total cost under an average-bit budget charged on the bytes the
packed payload really allocates (``cache_bytes``): each format's pool holds
one row per (layer, head) stored in it, so any layer may spend more bits
than another and a plan's bytes follow the bits it spends.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmcache_jax import attention, progress
from lmcache_jax.arch.rope import inverse_frequencies
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.step import append_step
from lmcache_jax.models.llama import Projections
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant.plan import QuantPlan

BITS = (2, 3, 4, 8)
Formats = tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Activations:
  """The calibration ``tokens`` [T] and, per layer, float32: queries
  [L, N, T, Hd] and keys_rope/values [L, K, T, Hd] as the cache sees them;
  keys [L, K, T, Hd] before RoPE."""
  tokens: np.ndarray
  queries: np.ndarray
  keys: np.ndarray
  keys_rope: np.ndarray
  values: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer(graphdef, state, x, kv, layer, step):
  """The model's block ``layer`` over x: (its output, the cache, what it
  projected)."""
  block = nnx.merge(graphdef, state)
  x, kv, _, proj = block(x, kv, layer, step, inverse_frequencies(block.cfg),
                         attention.Request(), trace=True)
  return x, kv, proj


def collect(lm: LoadedModel, tokens) -> Activations:
  """Runs ``tokens`` (one sequence) through the model's own layers in
  float32, one layer at a time, and returns what each layer put in (and
  asked of) its cache."""
  cfg = lm.cfg
  tokens = jnp.asarray(np.asarray(tokens, np.int32)[None])
  steps = tokens.shape[1]
  model = nnx.merge(lm.graphdef, jax.tree.map(
      lambda a: a.astype(jnp.float32), lm.params))
  graphdef, stacked = nnx.split(model.blocks)
  cache = init_cache(cfg, 1, steps, jnp.float32)
  step = append_step(cache, jnp.array([steps], jnp.int32), steps)
  kv = attention.LayerKV(cache.keys, cache.values, cache.positions,
                         cache.scores)
  x = model.embed_tokens(tokens)
  out = {name: [] for name in Projections._fields}
  for l in progress.bar(range(cfg.num_layers), desc="calibration",
                        unit="layer"):
    x, kv, proj = _layer(graphdef, stacked, x, kv, jnp.int32(l),
                         step._replace(slots=step.slots[l]))
    for name, value in proj._asdict().items():   # [1, T, H, Hd] -> [H, T, Hd]
      out[name].append(np.asarray(jnp.swapaxes(value[0], 0, 1)))
  return Activations(np.asarray(tokens[0]),
                     **{k: np.stack(v) for k, v in out.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class Storage:
  """How the cache transforms head vectors before quantizing them (the plan
  fields of the same names): keys centered on calibrated channel means,
  every vector Hadamard-rotated, outlier entries kept exact. Policies
  measure with it and put it in the plans they return."""
  rotate: bool = False
  key_shift: np.ndarray | None = None   # [L, K, Hd]
  outliers: int = 0                     # entries per vector kept exact

  def shift(self, layer: int, head: int):
    """[Hd] channel means of one head's keys (None when not centered)."""
    return None if self.key_shift is None else self.key_shift[layer, head]


def key_means(acts: Activations) -> np.ndarray:
  """[L, K, Hd] float32 mean of every key channel (after RoPE) over tokens."""
  return acts.keys_rope.mean(axis=2).astype(np.float32)


def rows_of(formats) -> dict:
  """Rows each format's pool holds (``payload.empty``'s rule): every
  (layer, head) stored in it."""
  names = {f for row in formats for f in row}
  return {n: sum(f == n for row in formats for f in row) for n in names}


def cache_bytes(cfg, template: QuantPlan, capacity: int | None = None,
                dtype=jnp.bfloat16) -> Callable[[Formats], int]:
  """formats [L][K] -> bytes of the key and value payload that
  ``init_cache(cfg, 1, capacity, dtype, quant=template with these formats)``
  allocates: codes, scales, zero codes, outliers, exact copies and maps
  (``KVCache.payload_nbytes``, read from ``jax.eval_shape``, so nothing is
  allocated). ``capacity`` defaults to the model's context."""
  capacity = capacity or cfg.max_context

  def nbytes(formats: Formats) -> int:
    plan = template.replace(formats=tuple(tuple(row) for row in formats))
    shape = jax.eval_shape(
        lambda: init_cache(cfg, 1, capacity, dtype, quant=plan))
    return int(shape.payload_nbytes)
  return nbytes


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What ``allocate`` chose: ``bits`` [L][K], the rows per width the payload
  allocates for it, its bytes and the budget's, its total cost, and the bits
  summed over heads it was chosen within (``cheapest_bits``' ``total``)."""
  bits: list[list[int]]
  rows: dict[int, int]
  nbytes: int
  budget_bytes: float
  cost: float
  total_bits: int

  @property
  def formats(self) -> Formats:
    return formats_of(self.bits)


def check_bits(bits) -> tuple[int, ...]:
  bits = tuple(int(b) for b in bits)
  bad = [b for b in bits if b not in BITS]
  if bad or not bits or len(set(bits)) != len(bits):
    raise ValueError(f"allocation bit widths {bits}: each must be one of "
                     f"{', '.join(map(str, BITS))}, without repeats")
  return tuple(sorted(bits))


def budget_bytes(uniform: dict[int, int], bits: float) -> float:
  """Bytes of ``bits`` average bits: exactly the uniform plan's at a width of
  the set (``uniform``: width -> its bytes), linear in between and beyond (a
  head's bytes are affine in its bits)."""
  widths = sorted(uniform)
  if bits in uniform:
    return float(uniform[bits])
  if len(widths) == 1:   # one width: its bytes or nothing below them
    return float(uniform[widths[0]]) if bits >= widths[0] else -1.0
  i = int(np.clip(np.searchsorted(widths, bits) - 1, 0, len(widths) - 2))
  low, high = widths[i], widths[i + 1]
  slope = (uniform[high] - uniform[low]) / (high - low)
  return uniform[low] + slope * (bits - low)


def cheapest_bits(costs: np.ndarray, bits: tuple[int, ...],
                  total: int) -> tuple[np.ndarray, float]:
  """Bits [L, K] from ``bits`` minimising ``sum costs[l, k, bits.index(b)]``
  with at most ``total`` bits summed over heads (a multiple-choice knapsack,
  solved exactly by dynamic programming over the bits spent); (bits, cost)."""
  num_layers, num_kv, _ = costs.shape
  flat = costs.reshape(num_layers * num_kv, len(bits))
  least = min(bits) * len(flat)
  if total < least:
    raise ValueError(f"{total} bits cannot hold {len(flat)} heads of at least "
                     f"{min(bits)} bits")
  room = min(total, max(bits) * len(flat)) - least   # bits above the minimum
  extra = [b - min(bits) for b in bits]
  best = np.full(room + 1, np.inf)
  best[0] = 0.0
  picks = np.zeros((len(flat), room + 1), np.int8)
  for i, head in enumerate(flat):
    new = np.full(room + 1, np.inf)
    for j, (e, c) in enumerate(zip(extra, head)):
      if e > room:
        continue
      cand = np.full(room + 1, np.inf)
      cand[e:] = best[:room + 1 - e] + c
      better = cand < new
      new[better], picks[i, better] = cand[better], j
    best = new
  spent = int(np.argmin(best))
  chosen = np.zeros(len(flat), np.int64)
  for i in range(len(flat) - 1, -1, -1):
    j = picks[i, spent]
    chosen[i] = bits[j]
    spent -= extra[j]
  return chosen.reshape(num_layers, num_kv), float(best.min())


def allocate(costs: np.ndarray, budget: float, bits=BITS, *,
             nbytes: Callable[[Formats], int]) -> Allocation:
  """Bits [L][K] minimising ``sum costs[l, k, bits.index(b)]`` within the
  bytes of ``budget`` average bits, every byte the payload allocates paid.

  Each format's pool holds exactly its (layer, head) pairs, so a plan's bytes
  are what every plan pays plus one row per head, affine in its bits: the
  budget is a number of bits summed over heads, any layer may spend more
  than another, and the best plan within it is an exact knapsack
  (``cheapest_bits``). The plan's real bytes are then checked (the per-layer
  row maps grow with the mix) and the bits lowered until they fit.

  Args:
    costs: [L, K, len(bits)] cost of storing head k of layer l at each width.
    budget: average bits per element; its bytes are the uniform plan's at
      that width (interpolated between widths).
    bits: widths to choose from, a subset of ``BITS``.
    nbytes: formats [L][K] -> bytes the cache allocates (``cache_bytes``).
  """
  bits = check_bits(bits)
  num_layers, num_kv, num_bits = costs.shape
  if num_bits != len(bits):
    raise ValueError(f"costs has {num_bits} widths per head, bits {bits}")
  heads = num_layers * num_kv
  uniform = {b: nbytes(formats_of([[b] * num_kv] * num_layers)) for b in bits}
  limit = budget_bytes(uniform, budget)
  if limit < uniform[bits[0]]:
    raise ValueError(f"no plan of {'/'.join(map(str, bits))}-bit heads fits "
                     f"{budget:g} average bits; the cheapest, all "
                     f"{bits[0]}-bit, needs kv_bits >= {bits[0]}")
  per_bit = ((uniform[bits[-1]] - uniform[bits[0]])
             / ((bits[-1] - bits[0]) * heads) if len(bits) > 1 else 1.0)
  total = bits[0] * heads + int((limit - uniform[bits[0]]) / per_bit + 1e-9)
  while True:
    chosen, cost = cheapest_bits(costs, bits, total)
    real = nbytes(formats_of(chosen))
    if real <= limit + 1e-6:
      break
    total = min(total - 1, int(chosen.sum()) - 1)
  return Allocation(chosen.tolist(), rows_of(chosen.tolist()), real, limit,
                    cost, total)


def formats_of(bits_per_head) -> Formats:
  return tuple(tuple(format_for_bits(b).name for b in row)
               for row in bits_per_head)


def plan_for(cfg, costs: np.ndarray, budget: float, template: QuantPlan,
             capacity: int | None = None) -> QuantPlan:
  """``template`` with the formats ``allocate`` picks for ``costs`` under
  ``budget`` average bits, bytes counted on the cache the template's knobs
  allocate (``cache_bytes``)."""
  chosen = allocate(costs, budget, nbytes=cache_bytes(cfg, template, capacity))
  return template.replace(formats=chosen.formats)
