"""What calibration policies measure, and how they split a bit budget.

``collect`` runs the model over calibration text layer by layer and keeps,
per layer, the rotated queries and the keys (before and after RoPE) and
values every kv head produced. ``attention_error`` is the relative error of
one head's attention output when its cache is stored in a format.
``allocate`` picks formats for every (layer, head) minimising a total cost
under an average-bit budget, giving every layer the same multiset of formats
so the packed cache has no padding rows (see ``payload``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.optimize import linear_sum_assignment

from lmcache_jax import attention
from lmcache_jax.arch.rope import inverse_frequencies
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.step import append_step
from lmcache_jax.kernels.masking import MASKED
from lmcache_jax.models.llama import at_layer, rms_norm
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import Format, format_for_bits
from lmcache_jax.quant import transform

BITS = (2, 3, 4, 8)


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
  for l in range(cfg.num_layers):
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


def allocate(costs: np.ndarray, budget: float, bits=BITS) -> list[list[int]]:
  """Bits [L][K] minimising ``sum costs[l, k, bits.index(b)]``.

  Every layer gets the same multiset of bit widths (whose mean is at most
  ``budget``); each layer assigns it to its heads optimally. Raises when no
  multiset fits the budget.
  """
  num_layers, num_kv, _ = costs.shape
  best, best_total = None, np.inf
  for combo in itertools.combinations_with_replacement(range(len(bits)),
                                                       num_kv):
    if np.mean([bits[i] for i in combo]) > budget + 1e-9:
      continue
    total, choice = 0.0, []
    for l in range(num_layers):
      # cost matrix heads × slots of the multiset
      matrix = costs[l][:, list(combo)]
      heads, picks = linear_sum_assignment(matrix)
      total += matrix[heads, picks].sum()
      row = [0] * num_kv
      for h, p in zip(heads, picks):
        row[h] = bits[combo[p]]
      choice.append(row)
    if total < best_total:
      best, best_total = choice, total
  if best is None:
    raise ValueError(f"no bit widths from {bits} average at most {budget}; "
                     f"use kv_bits >= {min(bits)}")
  return best


def formats_of(bits_per_head: list[list[int]]) -> tuple[tuple[str, ...], ...]:
  return tuple(tuple(format_for_bits(b).name for b in row)
               for row in bits_per_head)
