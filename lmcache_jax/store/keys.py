"""Content addresses of KV chunks: a hash chain over whole chunks of tokens.

Chunk ``i``'s key is ``sha256(key[i-1] || tokens of chunk i)`` with the chain
rooted at a namespace that hashes everything else the KV depends on (model
weights, cache layout and dtype or quant plan, layer range, chunk size). Equal
keys therefore mean equal prefixes under equal models, so a hit is exact.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import jax
import numpy as np

KEY_BYTES = 32


def model_fingerprint(lm, sample: int = 4096) -> bytes:
  """A digest of a model's config, dtype and weights.

  Hashes every parameter's shape and its first ``sample`` elements: cheap for
  a 13B model on a GPU, and two checkpoints of one architecture still differ.
  """
  h = hashlib.sha256()
  h.update(repr(lm.cfg).encode())
  h.update(str(jax.numpy.dtype(lm.dtype)).encode())
  leaves = jax.tree_util.tree_leaves_with_path(lm.params)
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(repr((tuple(leaf.shape), str(leaf.dtype))).encode())
    h.update(np.asarray(leaf.reshape(-1)[:sample]).tobytes())
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
