"""Content addresses of KV chunks: a hash chain over whole chunks of tokens.

Chunk ``i``'s key is ``sha256(key[i-1] || tokens of chunk i)`` with the chain
rooted at a namespace that hashes everything else the KV depends on (model
weights, cache layout and dtype or quant plan, layer range, chunk size). Equal
keys therefore mean equal prefixes under equal models and cache formats
(docs/store.md says what a hit equals).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import weakref
from typing import Sequence

import jax
import numpy as np

KEY_BYTES = 32


def model_fingerprint(lm) -> bytes:
  """A digest of a model's config, dtype and every bit of every weight.

  Each parameter's path, shape and dtype are hashed with the SHA-256 of all
  its elements, so two checkpoints that differ in any element of any layer
  differ. The parameters are hashed in parallel, one at a time on the host
  (about a second for SmolLM2 on two cores, in bounded host memory); weights that are the same arrays
  as at the last call reuse its digests.
  """
  h = hashlib.sha256()
  h.update(repr(lm.cfg).encode())
  h.update(str(jax.numpy.dtype(lm.dtype)).encode())
  leaves = sorted(jax.tree_util.tree_leaves_with_path(lm.params),
                  key=lambda pl: jax.tree_util.keystr(pl[0]))
  digests = _weight_digests([leaf for _, leaf in leaves])
  for (path, leaf), digest in zip(leaves, digests):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(repr((tuple(leaf.shape), str(leaf.dtype))).encode())
    h.update(digest)
  return h.digest()


# Host memory one hashing thread holds at a time.
_PIECE_BYTES = 1 << 28
# The last call's weights (weak references) and their digests.
_last: tuple = ((), ())


def _weight_digests(leaves: list) -> tuple[bytes, ...]:
  global _last
  refs, digests = _last
  if len(refs) == len(leaves) and all(
      ref() is leaf for ref, leaf in zip(refs, leaves)):
    return digests
  threads = max(1, min(len(leaves), os.cpu_count() or 1, 8))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    digests = tuple(pool.map(_digest, leaves))
  _last = (tuple(weakref.ref(leaf) for leaf in leaves), digests)
  return digests


def _digest(leaf) -> bytes:
  """SHA-256 of the bytes of an array, brought to the host a slice of at
  most about ``_PIECE_BYTES`` at a time (along its first axis)."""
  h = hashlib.sha256()
  rows = leaf.shape[0] if leaf.ndim else 1
  step = max(1, rows * _PIECE_BYTES // max(leaf.nbytes, 1))
  for start in range(0, rows, step):
    piece = jax.device_get(leaf[start:start + step] if leaf.ndim else leaf)
    h.update(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
  return h.digest()


def namespace(*parts: bytes | str | int) -> bytes:
  """The root of a key chain: a digest of the things besides tokens."""
  h = hashlib.sha256(b"lmcache_jax/kv-chunk/v1")
  for part in parts:
    data = part if isinstance(part, bytes) else str(part).encode()
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.digest()


def chunk_keys(tokens: Sequence[int], chunk_size: int, root: bytes,
               max_chunks: int | None = None) -> list[bytes]:
  """Keys of the whole chunks of ``tokens`` (a trailing partial chunk has none)."""
  array = np.asarray(tokens, np.int64)
  if array.ndim != 1:
    raise ValueError(f"tokens must be one flat sequence, got shape {array.shape}")
  count = len(array) // chunk_size
  if max_chunks is not None:
    count = min(count, max_chunks)
  keys, parent = [], root
  for i in range(count):
    chunk = array[i * chunk_size:(i + 1) * chunk_size].astype("<i8")
    parent = hashlib.sha256(parent + chunk.tobytes()).digest()
    keys.append(parent)
  return keys
