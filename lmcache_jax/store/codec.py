"""One chunk as bytes: header, key, leaf arrays, and a checksum or an AEAD tag.

  magic "LMKV" | version u8 | flags u8 | key (32) | body length u64 | body
  plain:     body = header length u32 | header json | leaf bytes ; then sha256
             of everything before it
  encrypted: body = AES-GCM(header length | header json | leaf bytes), the
             prefix (magic .. key) as associated data

The key is inside the file, so a file renamed or swapped into another key's
place is rejected; the checksum (or tag) catches flipped bits and truncation;
the header's shapes and dtypes must match the layout the reader expects.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from lmcache_jax.store.crypto import Cipher

MAGIC = b"LMKV"
VERSION = 1
ENCRYPTED = 1
_PREFIX = struct.Struct("<4sBB32sQ")


class CorruptChunk(Exception):
  """A stored chunk failed a check; it must be dropped, never served."""


def encode(key: bytes, leaves: list[np.ndarray],
           cipher: Cipher | None = None) -> bytes:
  header = json.dumps([[list(a.shape), str(a.dtype)] for a in leaves]).encode()
  parts = [struct.pack("<I", len(header)), header] + [
      # Bytes views (a buffer of bfloat16 or fp8 items cannot be cast).
      np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in leaves]
  flags = ENCRYPTED if cipher else 0
  if cipher:
    associated = _PREFIX.pack(MAGIC, VERSION, flags, key, 0)[:-8]
    body = cipher.seal(b"".join(parts), associated)
    return _PREFIX.pack(MAGIC, VERSION, flags, key, len(body)) + body
  length = sum(len(p) for p in parts)
  prefix = _PREFIX.pack(MAGIC, VERSION, flags, key, length)
  digest = hashlib.sha256(prefix)
  for part in parts:
    digest.update(part)
  return b"".join([prefix, *parts, digest.digest()])


def decode(blob: bytes, key: bytes, expected: list[tuple[tuple[int, ...], str]],
           cipher: Cipher | None = None) -> list[np.ndarray]:
  """The leaf arrays of ``blob`` if it is intact, holds ``key`` and matches
  ``expected`` (shape, dtype) per leaf; raises ``CorruptChunk`` otherwise."""
  if len(blob) < _PREFIX.size:
    raise CorruptChunk(f"truncated: {len(blob)} bytes")
  magic, version, flags, stored_key, length = _PREFIX.unpack_from(blob)
  if magic != MAGIC or version != VERSION:
    raise CorruptChunk(f"not a chunk file (magic {magic!r}, version {version})")
  if stored_key != key:
    raise CorruptChunk("holds another chunk's key")
  if bool(flags & ENCRYPTED) != (cipher is not None):
    raise CorruptChunk("encrypted" if flags & ENCRYPTED else "not encrypted")
  tail = 0 if cipher else 32
  if len(blob) != _PREFIX.size + length + tail:
    raise CorruptChunk(f"length {len(blob)} != {_PREFIX.size + length + tail}")
  view = memoryview(blob)  # slices of a view copy nothing
  body = view[_PREFIX.size:_PREFIX.size + length]
  if cipher:
    body = cipher.open(bytes(body), blob[:_PREFIX.size - 8])
    if body is None:
      raise CorruptChunk("authentication failed (tampered or another key)")
  elif hashlib.sha256(view[:-32]).digest() != blob[-32:]:
    raise CorruptChunk("checksum mismatch")
  (header_len,) = struct.unpack_from("<I", body)
  try:
    header = json.loads(bytes(body[4:4 + header_len]))
  except ValueError as e:
    raise CorruptChunk(f"bad header: {e}") from None
  got = [(tuple(shape), dtype) for shape, dtype in header]
  if got != [(tuple(s), d) for s, d in expected]:
    raise CorruptChunk(f"layout {got} != expected {expected}")
  leaves, offset = [], 4 + header_len
  for shape, dtype in got:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    leaves.append(np.frombuffer(body, np.dtype(dtype), int(np.prod(shape)),
                                offset).reshape(shape))
    offset += size
  if offset != len(body):
    raise CorruptChunk(f"body holds {len(body)} bytes, layout needs {offset}")
  return leaves

