"""What calibration policies measure, and how they split a bit budget.

``collect`` runs the model over calibration text layer by layer and keeps,
per layer, the rotated queries and the keys (before and after RoPE) and
values every kv head produced. ``attention_error`` is the relative error of
one head's attention output when its cache is stored in a format.
``allocate`` picks a width from {2, 3, 4, 8} for every (layer, head)
minimising a total cost under an average-bit budget charged on the bytes the
packed payload really allocates, padding rows included (``cache_bytes``):
the payload holds, per format, as many rows as the most heads any layer
stores in it, so layers may differ only by paying for rows some leave empty.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.optimize import linear_sum_assignment

from lmcache_jax import attention, progress
from lmcache_jax.arch.rope import inverse_frequencies
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.step import append_step
from lmcache_jax.kernels.masking import MASKED
from lmcache_jax.models.llama import at_layer, rms_norm
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import Format, format_for_bits
from lmcache_jax.quant import transform
from lmcache_jax.quant.plan import QuantPlan

BITS = (2, 3, 4, 8)
Formats = tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Activations:
  """Per layer, float32: queries [L, N, T, Hd] and keys_rope/values
  [L, K, T, Hd] as the cache sees them; keys [L, K, T, Hd] before RoPE."""
  queries: np.ndarray
  keys: np.ndarray
  keys_rope: np.ndarray
  values: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer(graphdef, state, x, kv, layer, step):
  """One block over x: (its output, the cache, rotated q, k before RoPE)."""
  block = nnx.merge(graphdef, state)
  inv_freq = inverse_frequencies(block.cfg)
  h = rms_norm(x, at_layer(block.attn_norm, layer), block.cfg.norm_eps)
  q, k, _, _ = block.attn.project(h, layer, step.rope_positions, inv_freq)
  x, kv, _ = block(x, kv, layer, step, inv_freq, attention.Request())
  return x, kv, q, k


def collect(lm: LoadedModel, tokens) -> Activations:
  """Runs ``tokens`` (one sequence) through the model in float32, one layer
  at a time, and returns what each layer put in (and asked of) its cache."""
  cfg = lm.cfg
  tokens = jnp.asarray(np.asarray(tokens, np.int32)[None])
  steps = tokens.shape[1]
  model = nnx.merge(lm.graphdef, lm.params)
  graphdef, stacked = nnx.split(model.blocks)
  stacked = jax.tree.map(lambda a: a.astype(jnp.float32), stacked)
  cache = init_cache(cfg, 1, steps, jnp.float32)
  step = append_step(cache, jnp.array([steps], jnp.int32), steps)
  kv = attention.LayerKV(cache.keys, cache.values, cache.positions,
                         cache.scores)
  x = jnp.take(model.embed[...].astype(jnp.float32), tokens, axis=0)
  out = {"queries": [], "keys": [], "keys_rope": [], "values": []}
  for l in progress.bar(range(cfg.num_layers), desc="calibration",
                        unit="layer"):
    x, kv, q, k = _layer(graphdef, stacked, x, kv, jnp.int32(l),
                         step._replace(slots=step.slots[l]))
    out["queries"].append(np.asarray(jnp.swapaxes(q[0], 0, 1)))
    out["keys"].append(np.asarray(jnp.swapaxes(k[0], 0, 1)))
    out["keys_rope"].append(np.asarray(kv.keys[l, 0]))
    out["values"].append(np.asarray(kv.values[l, 0]))
  return Activations(**{k: np.stack(v) for k, v in out.items()})


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


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "residual",
                                             "rotate", "outliers"))
def attention_error(queries, keys, values, key_scale, key_shift=None, *,
                    fmt: Format, group_size: int, residual: int,
                    rotate: bool = False, outliers: int = 0):
  """Relative squared error of causal attention outputs of one kv head.

  Args:
    queries: [G, T, Hd] the group's rotated queries.
    keys, values: [T, Hd] the head's rotated keys and values.
    key_scale, key_shift: [Hd] key divisors and channel means
      (``transform.stored``).
    residual: tokens within this distance of a query are read exact.
    rotate: the cache stores Hadamard-rotated vectors.
    outliers: entries per stored vector kept exact.
  """
  fake = lambda x, scale, shift: transform.restored(
      schemes.fake_quant(transform.stored(x, scale, shift, rotate), fmt,
                         group_size, outliers), scale, shift, rotate)
  kq = fake(keys, key_scale, key_shift)
  vq = fake(values, None, None)
  steps, head_dim = keys.shape
  t = jnp.arange(steps)
  dist = t[:, None] - t[None, :]
  visible = dist >= 0
  exact = dist < residual

  hi = jax.lax.Precision.HIGHEST

  def attend(k_near, k_far, v_near, v_far):
    """Tokens within ``residual`` of the query read (k_near, v_near)."""
    logits = jnp.where(exact,
                       jnp.einsum("GTH,SH->GTS", queries, k_near, precision=hi),
                       jnp.einsum("GTH,SH->GTS", queries, k_far, precision=hi))
    p = jax.nn.softmax(jnp.where(visible, logits * head_dim ** -0.5, MASKED),
                       axis=-1)
    return (jnp.einsum("GTS,SH->GTH", jnp.where(exact, p, 0.0), v_near,
                       precision=hi)
            + jnp.einsum("GTS,SH->GTH", jnp.where(exact, 0.0, p), v_far,
                         precision=hi))

  want = attend(keys, keys, values, values)
  got = attend(keys, kq, values, vq)
  return jnp.sum((got - want) ** 2) / jnp.sum(want ** 2)


def rows_of(formats) -> dict:
  """Rows the packed payload allocates per format (``payload.empty``'s rule):
  the most heads any one layer stores in that format."""
  names = {f for row in formats for f in row}
  return {n: max(sum(f == n for f in row) for row in formats) for n in names}


def cache_bytes(cfg, template: QuantPlan, capacity: int | None = None,
                dtype=jnp.bfloat16) -> Callable[[Formats], int]:
  """formats [L][K] -> bytes of the key and value payload that
  ``init_cache(cfg, 1, capacity, dtype, quant=template with these formats)``
  allocates: codes, scales, zero codes, outliers, padding rows, exact copies
  and maps (``KVCache.payload_nbytes``, read from ``jax.eval_shape``, so
  nothing is allocated). ``capacity`` defaults to the model's context."""
  capacity = capacity or cfg.max_context

  def nbytes(formats: Formats) -> int:
    plan = template.replace(formats=tuple(tuple(row) for row in formats))
    shape = jax.eval_shape(
        lambda: init_cache(cfg, 1, capacity, dtype, quant=plan))
    return int(shape.payload_nbytes)
  return nbytes


@dataclasses.dataclass(frozen=True)
class RowBytes:
  """A payload's bytes as ``base + sum_b rows[b] * row[b]``: one row of bit
  width b costs ``row[b]`` (codes, scale and zero of every slot, its head map,
  keys and values, every layer); ``base`` is what every plan pays (copies,
  slot maps, key scales and means)."""
  base: int
  row: dict[int, int]

  def of(self, rows: dict[int, int]) -> int:
    return self.base + sum(n * self.row[b] for b, n in rows.items())

  def budget(self, bits: float, num_kv: int) -> float:
    """Bytes of ``bits`` average bits: exactly the uniform plan's at a width
    of the set, linear in between and beyond (a row's bytes are affine in
    its bits)."""
    widths = sorted(self.row)
    uniform = [self.base + num_kv * self.row[b] for b in widths]
    if bits in widths:
      return float(uniform[widths.index(bits)])
    if len(widths) == 1:   # one width: its bytes or nothing below them
      return uniform[0] if bits >= widths[0] else -1.0
    i = int(np.clip(np.searchsorted(widths, bits) - 1, 0, len(widths) - 2))
    slope = (uniform[i + 1] - uniform[i]) / (widths[i + 1] - widths[i])
    return uniform[i] + slope * (bits - widths[i])


def row_bytes(nbytes: Callable[[Formats], int], bits, num_layers: int,
              num_kv: int) -> RowBytes:
  """Measures ``RowBytes`` from ``nbytes`` (formats -> real bytes): every
  uniform plan, and, for each width b, the plan of another width c with one
  head of layer 1 in b (c keeps all its rows: one row of b is added)."""
  names = {b: format_for_bits(b).name for b in bits}
  uniform = {b: nbytes(((names[b],) * num_kv,) * num_layers) for b in bits}
  if len(bits) == 1 or num_layers == 1:
    # one row per head in every plan (no layer to pad): only the mix counts
    return RowBytes(0, {b: uniform[b] / num_kv for b in bits})
  row = {}
  for b in bits:
    c = next(w for w in bits if w != b)
    plan = [[names[c]] * num_kv for _ in range(num_layers)]
    plan[1][0] = names[b]
    row[b] = nbytes(plan) - uniform[c]
  bases = {uniform[b] - num_kv * row[b] for b in bits}
  if len(bases) != 1:
    raise RuntimeError(f"payload bytes are not affine in rows per format "
                       f"(bases {sorted(bases)}): the allocator's byte model "
                       f"no longer matches the payload layout")
  return RowBytes(bases.pop(), row)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What ``allocate`` chose: ``bits`` [L][K], the rows per width the payload
  allocates for it, its bytes and the budget's, and its total cost."""
  bits: list[list[int]]
  rows: dict[int, int]
  nbytes: int
  budget_bytes: float
  cost: float

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


def row_pools(model: RowBytes, budget_bytes: float, num_layers: int,
              num_kv: int) -> list[dict[int, int]]:
  """Maximal row counts per width whose bytes fit: every plan within the
  budget has row counts at or below one of these (bytes grow with rows)."""
  bits = sorted(model.row)
  fits = lambda r: (sum(r) >= num_kv and model.of(dict(zip(bits, r)))
                    <= budget_bytes + 1e-6)
  # with one layer rows beyond the heads are never used, nor paid for
  most = num_kv
  pools = []
  for r in itertools.product(range(most + 1), repeat=len(bits)):
    if num_layers == 1 and sum(r) != num_kv:
      continue
    if not fits(r):
      continue
    grown = [r[:i] + (r[i] + 1,) + r[i + 1:] for i in range(len(bits))
             if r[i] < most]
    if num_layers == 1 or not any(fits(g) for g in grown):
      pools.append(dict(zip(bits, r)))
  return pools


def allocate(costs: np.ndarray, budget: float, bits=BITS, *,
             nbytes: Callable[[Formats], int]) -> Allocation:
  """Bits [L][K] minimising ``sum costs[l, k, bits.index(b)]`` under a byte
  budget of ``budget`` average bits, padding rows paid.

  The payload holds, per width b, R_b rows in every layer (the most heads
  any layer stores in b), so a plan's bytes depend on (R_b) alone and grow
  with each. Exact: every maximal (R_b) whose bytes fit is tried (a plan is
  never worse with more rows to choose from), and each layer assigns its
  heads to at most R_b rows per width optimally (a linear assignment of
  heads to the pool's rows). Layers differ when sum R_b exceeds the heads.

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
  model = row_bytes(nbytes, bits, num_layers, num_kv)
  budget_bytes = model.budget(budget, num_kv)
  pools = row_pools(model, budget_bytes, num_layers, num_kv)
  if not pools:
    raise ValueError(f"no plan of {'/'.join(map(str, bits))}-bit heads fits "
                     f"{budget:g} average bits; the cheapest, all "
                     f"{bits[0]}-bit, needs kv_bits >= {bits[0]}")
  best = None
  for pool in pools:
    columns = [i for i, b in enumerate(bits) for _ in range(pool[b])]
    total, choice = 0.0, []
    for l in range(num_layers):
      matrix = costs[l][:, columns]     # heads x the pool's rows
      heads, picks = linear_sum_assignment(matrix)
      total += float(matrix[heads, picks].sum())
      row = [0] * num_kv
      for h, p in zip(heads, picks):
        row[h] = bits[columns[p]]
      choice.append(row)
    used = rows_of(choice)
    key = (total, model.of(used))
    if best is None or key < best[0]:
      best = (key, choice, used)
  (total, model_bytes), choice, used = best
  real = nbytes(formats_of(choice))
  if real != model_bytes:
    raise RuntimeError(f"allocation counted {model_bytes} bytes but the "
                       f"payload allocates {real}")
  return Allocation(choice, used, real, budget_bytes, total)


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
