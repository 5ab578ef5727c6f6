"""A few sizes for the shapes that follow a text's length.

Every new cache capacity or prompt width compiles new programs, and a process
keeps every program it compiled. On the CPU each holds a few hundred memory
maps (XLA's compiled code), and the kernel refuses a process more than
``vm.max_map_count`` (65,530 by default): some hundred distinct prompt lengths
in one process ended in "LLVM compilation error: Cannot allocate memory".
Sizes rounded up to a bucket bound what a run compiles: four buckets per
doubling (16, 20, 24, 28, 32, 40, 48, ...), so padding adds at most 25%.
Padding never changes a result: padded tokens and empty slots are masked.
"""

from __future__ import annotations

from lmcache_jax.cache.policy import CachePolicy

SMALLEST = 16


def bucket(n: int) -> int:
  """The smallest bucket >= ``n``: ``SMALLEST``, or ``n`` rounded up to a
  multiple of an eighth of the power of two at or above it (``n`` in
  (2^k, 2^(k+1)] rounds up to a multiple of 2^(k-2))."""
  if n <= 0:
    raise ValueError(f"a size to bucket must be positive, got {n}")
  if n <= SMALLEST:
    return SMALLEST
  step = 1 << ((n - 1).bit_length() - 3)
  return -(-n // step) * step


def cache_capacity(policy: CachePolicy, context: int, chunk: int,
                   new_tokens: int = 0) -> int:
  """``policy.cache_capacity(...)``, rounded up to a bucket where that
  changes nothing: a cache that holds the whole context never fills, so its
  extra slots stay empty. A smaller one is sized by the policy's budget and
  the room it asks for (not by the text's length), and its size decides when
  a row is full and must evict: it stays as the policy asks."""
  needed = policy.cache_capacity(context, chunk, new_tokens)
  return bucket(needed) if needed >= context else needed
