"""The cache payload as the store sees it: leaves with a slot axis at index 3.

A cache's keys and values may be plain arrays or pytrees (a quantized
payload: packed integers plus scales). Every leaf is [L, B, K, S', ...] with
S' = S / g, g >= 1 the slots one stored entry covers. A chunk of ``c`` tokens
is, per leaf, the [L, K, c / g, ...] slice of one sequence. Everything here
walks the leaves with ``jax.tree_util``, so a quantized cache stores and moves
its packed bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax.cache.kv_cache import KVCache

SLOT_AXIS = 3


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  dtype: str
  group: int                 # slots per stored entry along the slot axis
  trailing: tuple[int, ...]  # shape after the slot axis


@dataclasses.dataclass(frozen=True)
class Layout:
  """Shapes and dtypes of the payload leaves, independent of batch and capacity."""
  treedef: Any
  leaves: tuple[LeafSpec, ...]
  num_layers: int
  num_kv_heads: int

  @classmethod
  def of(cls, cache: KVCache) -> "Layout":
    leaves, treedef = jax.tree_util.tree_flatten((cache.keys, cache.values))
    capacity = cache.capacity
    specs = []
    for leaf in leaves:
      if leaf.ndim < 4 or leaf.shape[:3] != cache.positions.shape[:3]:
        raise ValueError(
            f"a cache payload leaf of shape {leaf.shape} does not start with "
            f"[L, B, K] = {cache.positions.shape[:3]}; the store needs the slot "
            f"axis at index {SLOT_AXIS}")
      slots = leaf.shape[SLOT_AXIS]
      if slots == 0 or capacity % slots:
        raise ValueError(f"a payload leaf holds {slots} entries along the slot "
                         f"axis, which does not divide the capacity {capacity}")
      specs.append(LeafSpec(str(jnp.dtype(leaf.dtype)), capacity // slots,
                            tuple(leaf.shape[SLOT_AXIS + 1:])))
    return cls(treedef, tuple(specs), cache.num_layers, cache.num_kv_heads)

  def fingerprint(self) -> bytes:
    return hashlib.sha256(repr((str(self.treedef), self.leaves, self.num_layers,
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
    return [((self.num_layers, self.num_kv_heads, chunk_size // s.group)
             + s.trailing, s.dtype) for s in self.leaves]

  def chunk_nbytes(self, chunk_size: int) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for shape, dtype in self.chunk_shapes(chunk_size))


Chunk = tuple  # one array per payload leaf, [L, K, c / g, ...]


@functools.partial(jax.jit, static_argnames=("chunk_size", "groups"))
def _slice_chunk(leaves, row, start, *, chunk_size, groups):
  out = []
  for leaf, g in zip(leaves, groups):
    sizes = (leaf.shape[0], 1, leaf.shape[2], chunk_size // g) + leaf.shape[4:]
    begin = (0, row, 0, start // g) + (0,) * (leaf.ndim - 4)
    out.append(jax.lax.dynamic_slice(leaf, begin, sizes)[:, 0])
  return tuple(out)


def slice_chunk(cache: KVCache, layout: Layout, row: int, start: int,
                chunk_size: int) -> Chunk:
  """The chunk of tokens [start, start + chunk_size) of sequence ``row``."""
  leaves = jax.tree_util.tree_leaves((cache.keys, cache.values))
  return _slice_chunk(leaves, jnp.int32(row), jnp.int32(start),
                      chunk_size=chunk_size,
                      groups=tuple(s.group for s in layout.leaves))


@functools.partial(jax.jit, static_argnames=("groups",), donate_argnums=(0,))
def _put_chunk(leaves, chunk, row, start, *, groups):
  out = []
  for leaf, part, g in zip(leaves, chunk, groups):
    begin = (0, row, 0, start // g) + (0,) * (leaf.ndim - 4)
    out.append(jax.lax.dynamic_update_slice(
        leaf, part[:, None].astype(leaf.dtype), begin))
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
  leaves, treedef = jax.tree_util.tree_flatten((cache.keys, cache.values))
  groups = tuple(s.group for s in layout.leaves)
  for i, chunk in enumerate(chunks):
    leaves = _put_chunk(leaves, tuple(chunk), jnp.int32(row),
                        jnp.int32((first + i) * chunk_size), groups=groups)
  keys, values = jax.tree_util.tree_unflatten(treedef, leaves)
  return cache.replace(keys=keys, values=values)


def mark_prefix(cache: KVCache, row: int, n: int) -> KVCache:
  """Positions 0..n-1 and length n for sequence ``row``, as after a prefill."""
  positions, lengths = _mark_prefix(cache.positions, cache.lengths,
                                    jnp.int32(row), jnp.int32(n))
  return cache.replace(positions=positions, lengths=lengths)


def check_fits(cache: KVCache, layout: Layout, n: int) -> None:
  if n > cache.capacity:
    raise ValueError(f"a prefix of {n} tokens does not fit a cache of "
                     f"{cache.capacity} slots")
  if Layout.of(cache) != layout:
    raise ValueError("the cache's payload layout differs from the store's; "
                     "build the store for this cache's dtype and quantization")


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
