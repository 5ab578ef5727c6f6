"""The cache payload as the store sees it: slot arrays, one sequence at a time.

A cache's keys and values may be dense arrays or quantized payloads
(``quant.payload.QuantizedKV``: packed codes, scales, zeros and any outlier
entries per slot, in one row pool per format).
Every slot array has a batch axis, then a row axis, then its slot axis
S' = S / g, g >= 1 the slots one stored entry covers (g = the key group of
per-channel keys, KIVI: their scales, minima and sealed flags): dense keys
and values are [L, B, K, S, Hd], a payload's pools [B, P, S', ...]. A chunk
of ``c`` tokens is, per slot array, its slice of one sequence and c / g
entries ([L, K, c, Hd], [P, c / g, ...]), so a quantized cache stores and
moves its packed bytes. A payload's other leaves (which rows hold which
heads, the keys' channel scales) follow from its quant plan: they are
hashed into the layout's fingerprint, never stored.

Exact copies (sinks, recent window) belong to the latest tokens, not to a
chunk, so they are not stored: loading a prefix of n tokens rebuilds the
copies of its sinks and of its ``residual`` latest tokens from their codes
(``mark_prefix``). A loaded prefix thus reads those tokens as stored, where
recomputing it would read them exact; the difference ends once ``residual``
newer tokens have pushed them out of the window. Every whole chunk of a
per-channel key payload holds only full key groups (chunks are multiples of
the group), which the cache seals as soon as they fill, so stored codes are
final.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.quant.payload import QuantizedKV

def slot_arrays(kv) -> list[jax.Array]:
  """The arrays of a payload indexed by slot (in a fixed order)."""
  if not isinstance(kv, QuantizedKV):
    return [kv]
  return [getattr(p, name) for p in kv.parts for name in p.slot_leaves]


def batch_axis(kv) -> int:
  """The batch axis of ``kv``'s slot arrays (their rows and slots follow)."""
  return 0 if isinstance(kv, QuantizedKV) else 1


def with_slot_arrays(kv, arrays: list[jax.Array]):
  """``kv`` with its slot arrays replaced (the inverse of ``slot_arrays``)."""
  if not isinstance(kv, QuantizedKV):
    return arrays[0]
  arrays = iter(arrays)
  parts = tuple(p.replace(**{name: next(arrays) for name in p.slot_leaves})
                for p in kv.parts)
  return kv.replace(parts=parts)


def _plan_digest(kv) -> str:
  """Digest of a payload's structure and plan-given leaves (not its slots)."""
  if not isinstance(kv, QuantizedKV):
    return str(jnp.dtype(kv.dtype))
  h = hashlib.sha256(str(jax.tree_util.tree_structure(kv)).encode())
  h.update(f"rotate={kv.rotate}".encode())
  for leaf in ([p.heads for p in kv.parts]
               + [kv.channel_scale, kv.channel_shift]):
    if leaf is not None:
      h.update(np.asarray(leaf[:, :1]).tobytes())
  for part in kv.parts:
    h.update(np.asarray(part.first).tobytes())
  return h.hexdigest()


def _all_slot_arrays(cache: KVCache) -> list[jax.Array]:
  return slot_arrays(cache.keys) + slot_arrays(cache.values)


def _all_batch_axes(cache: KVCache) -> tuple[int, ...]:
  return tuple(batch_axis(kv) for kv in (cache.keys, cache.values)
               for _ in slot_arrays(kv))


def _replace_slot_arrays(cache: KVCache, arrays: list[jax.Array]) -> KVCache:
  n = len(slot_arrays(cache.keys))
  return cache.replace(keys=with_slot_arrays(cache.keys, arrays[:n]),
                       values=with_slot_arrays(cache.values, arrays[n:]))


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  dtype: str
  group: int                 # slots per stored entry along the slot axis
  batch_axis: int            # the rows and then the slot axis follow it
  lead: tuple[int, ...]      # the shape before the batch axis
  rows: int                  # rows (heads, or a pool's rows)
  tail: tuple[int, ...]      # the shape after the slot axis

  def chunk_shape(self, chunk_size: int) -> tuple[int, ...]:
    return (*self.lead, self.rows, chunk_size // self.group, *self.tail)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Shapes and dtypes of the payload leaves, independent of batch and capacity."""
  plan: tuple[str, str]      # digests of the keys' and values' structure
  leaves: tuple[LeafSpec, ...]
  num_layers: int
  num_kv_heads: int

  @classmethod
  def of(cls, cache: KVCache) -> "Layout":
    capacity = cache.capacity
    batch = cache.positions.shape[1]
    specs = []
    for leaf, axis in zip(_all_slot_arrays(cache), _all_batch_axes(cache)):
      if leaf.ndim < axis + 3 or leaf.shape[axis] != batch:
        raise ValueError(
            f"a cache payload leaf of shape {leaf.shape} has no batch axis "
            f"of {batch} sequences at index {axis} followed by rows and slots")
      slots = leaf.shape[axis + 2]
      if slots == 0 or capacity % slots:
        raise ValueError(f"a payload leaf holds {slots} entries along the slot "
                         f"axis, which does not divide the capacity {capacity}")
      specs.append(LeafSpec(str(jnp.dtype(leaf.dtype)), capacity // slots,
                            axis, tuple(leaf.shape[:axis]),
                            leaf.shape[axis + 1],
                            tuple(leaf.shape[axis + 3:])))
    return cls((_plan_digest(cache.keys), _plan_digest(cache.values)),
               tuple(specs), cache.num_layers, cache.num_kv_heads)

  def describe(self) -> str:
    """``dense float32``, or ``quantized (plan 1a2b3c4d)``."""
    plan = self.plan[0]
    return f"dense {plan}" if len(plan) < 64 else f"quantized (plan {plan[:8]})"

  def fingerprint(self) -> bytes:
    return hashlib.sha256(repr((self.plan, self.leaves, self.num_layers,
                                self.num_kv_heads)).encode()).digest()

  def check_chunk_size(self, chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
      raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for spec in self.leaves:
      if chunk_size % spec.group:
        groups = sorted({s.group for s in self.leaves})
        raise ValueError(
            f"chunk_size {chunk_size} does not divide into the cache layout: a "
            f"payload leaf stores one entry per {spec.group} slots; use a "
            f"multiple of {int(np.lcm.reduce(groups))}")

  def chunk_shapes(self, chunk_size: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each leaf of one chunk."""
    return [(s.chunk_shape(chunk_size), s.dtype) for s in self.leaves]

  def chunk_nbytes(self, chunk_size: int) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for shape, dtype in self.chunk_shapes(chunk_size))


Chunk = tuple  # one array per payload leaf: its slice of one sequence


def _chunk_begin(leaf, axis: int, row, start, group: int) -> tuple:
  return ((0,) * axis + (row, 0, start // group)
          + (0,) * (leaf.ndim - axis - 3))


@functools.partial(jax.jit, static_argnames=("chunk_size", "groups", "axes"))
def _slice_chunk(leaves, row, start, *, chunk_size, groups, axes):
  out = []
  for leaf, g, axis in zip(leaves, groups, axes):
    sizes = list(leaf.shape)
    sizes[axis], sizes[axis + 2] = 1, chunk_size // g
    out.append(jnp.squeeze(jax.lax.dynamic_slice(
        leaf, _chunk_begin(leaf, axis, row, start, g), sizes), axis))
  return tuple(out)


def slice_chunk(cache: KVCache, layout: Layout, row: int, start: int,
                chunk_size: int) -> Chunk:
  """The chunk of tokens [start, start + chunk_size) of sequence ``row``."""
  return _slice_chunk(_all_slot_arrays(cache), jnp.int32(row), jnp.int32(start),
                      chunk_size=chunk_size,
                      groups=tuple(s.group for s in layout.leaves),
                      axes=tuple(s.batch_axis for s in layout.leaves))


@functools.partial(jax.jit, static_argnames=("groups", "axes"),
                   donate_argnums=(0,))
def _put_chunk(leaves, chunk, row, start, *, groups, axes):
  out = []
  for leaf, part, g, axis in zip(leaves, chunk, groups, axes):
    out.append(jax.lax.dynamic_update_slice(
        leaf, jnp.expand_dims(part, axis).astype(leaf.dtype),
        _chunk_begin(leaf, axis, row, start, g)))
  return out


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _mark_prefix(positions, lengths, row, n):
  slots = jnp.arange(positions.shape[-1], dtype=jnp.int32)
  filled = jnp.where(slots < n, slots, positions[:, row])
  return positions.at[:, row].set(filled), lengths.at[row].set(n)


def write_chunks(cache: KVCache, layout: Layout, row: int, first: int,
                 chunks: list[Chunk], chunk_size: int) -> KVCache:
  """Writes ``chunks`` as chunks ``first, first + 1, ...`` of sequence ``row``
  (payload only; the cache is donated)."""
  leaves = _all_slot_arrays(cache)
  groups = tuple(s.group for s in layout.leaves)
  axes = tuple(s.batch_axis for s in layout.leaves)
  for i, chunk in enumerate(chunks):
    leaves = _put_chunk(leaves, tuple(chunk), jnp.int32(row),
                        jnp.int32((first + i) * chunk_size), groups=groups,
                        axes=axes)
  return _replace_slot_arrays(cache, leaves)


@functools.partial(jax.jit, donate_argnums=(0,))
def _rebuild_copies(kv, row, n):
  return qpayload.prefix_copies(kv, row, n)


def mark_prefix(cache: KVCache, row: int, n: int) -> KVCache:
  """Positions 0..n-1 and length n for sequence ``row``, as after a prefill;
  a quantized payload's copies of the prefix's sinks and ``residual`` latest
  tokens rebuilt from their codes (the module docstring says why)."""
  positions, lengths = _mark_prefix(cache.positions, cache.lengths,
                                    jnp.int32(row), jnp.int32(n))
  cache = cache.replace(positions=positions, lengths=lengths)
  for name in ("keys", "values"):
    kv = getattr(cache, name)
    if isinstance(kv, QuantizedKV) and kv.exact.shape[-2]:
      cache = cache.replace(**{name: _rebuild_copies(kv, jnp.int32(row),
                                                     jnp.int32(n))})
  return cache


def check_fits(cache: KVCache, layout: Layout, n: int) -> None:
  if n > cache.capacity:
    raise ValueError(f"a prefix of {n} tokens does not fit a cache of "
                     f"{cache.capacity} slots")
  check_layout(cache, layout)


def check_layout(cache: KVCache, layout: Layout) -> None:
  """Raises unless ``cache`` has the payload layout a store was built for."""
  mine = Layout.of(cache)
  if mine != layout:
    raise ValueError(
        f"the cache ({mine.describe()}) has another payload layout than the "
        f"store's ({layout.describe()}); a store serves caches of one dtype "
        f"and quantization: make it with the plan you generate with, "
        f"make_store(..., quant=plan) (e.g. quant=model.plan(kv_bits)), or "
        f"KVStore(Layout.of(cache), ...)")


def insert_prefix(cache: KVCache, layout: Layout, row: int,
                  chunks: list[Chunk], chunk_size: int) -> KVCache:
  """Writes ``chunks`` as tokens [0, n) of the empty sequence ``row``.

  Valid for caches where slot == position (no eviction): positions become
  0..n-1 and the length n, as if the prefix had been prefilled. The cache
  is donated.
  """
  n = len(chunks) * chunk_size
  check_fits(cache, layout, n)
  cache = write_chunks(cache, layout, row, 0, chunks, chunk_size)
  return mark_prefix(cache, row, n)
