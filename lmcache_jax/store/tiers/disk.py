"""The disk tier: one file per chunk, written atomically.

A storage tier: it holds encoded chunks, which the store verifies on every
read. A file is written under a temporary name and renamed into place, so a
reader sees a whole file or none; a write killed midway leaves only a
temporary file, removed at the next start. Chunk files left by earlier runs
are indexed at start. ``store.json`` records whether the directory is
encrypted and a check value of the key, so a store reopened with another key
(or none) fails with a clear error instead of dropping every chunk.
"""

from __future__ import annotations

import json
import os
import uuid

from lmcache_jax.store.tier import Replacement, Tier, log

SUFFIX = ".kv"
META = "store.json"


class DiskTier(Tier):
  """Chunk files under ``directory``, up to ``capacity`` bytes of them."""
  name = "disk"

  def __init__(self, directory: str, capacity: int, replacement: Replacement):
    super().__init__(capacity, replacement)
    if not isinstance(directory, str) or not directory:
      raise ValueError(f"the disk tier needs a directory (a path), got "
                       f"{directory!r}")
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.failures = 0
    self._reported: set[int | None] = set()
    self._check_directory()
    self._scan()

  def _check_directory(self) -> None:
    probe = os.path.join(self.directory, f".probe-{uuid.uuid4().hex}")
    try:
      os.makedirs(self.directory, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"ok")
      os.remove(probe)
    except OSError as e:
      raise ValueError(f"the disk tier's directory {self.directory!r} is not "
                       f"writable ({e.strerror}); give a directory this "
                       f"process can create files in") from None

  def check_key(self, key_check: str | None) -> None:
    path = os.path.join(self.directory, META)
    mine = {"format": 1, "encrypted": key_check is not None,
            "key_check": key_check}
    if os.path.exists(path):
      try:
        with open(path) as f:
          theirs = json.load(f)
      except (OSError, ValueError):
        theirs = None
      if isinstance(theirs, dict) and theirs.get("format") == 1:
        if theirs["encrypted"] != mine["encrypted"]:
          state = "encrypted" if theirs["encrypted"] else "not encrypted"
          raise ValueError(
              f"the store at {self.directory!r} is {state}; open it "
              f"{'with' if theirs['encrypted'] else 'without'} an encryption key")
        if theirs["key_check"] != mine["key_check"]:
          raise ValueError(f"the encryption key does not match the one the "
                           f"store at {self.directory!r} was written with")
        self._adopt(self._found)
        return
      log.warning("disk tier: unreadable %s in %s; rewriting it", META,
                  self.directory)
    self._atomic_write(META, json.dumps(mine).encode())
    self._adopt(self._found)

  def _scan(self) -> None:
    """Finds chunk files left by earlier runs and removes temporaries. The
    files are adopted (and the oldest evicted past the capacity) only once
    ``check_key`` has accepted the directory: a wrong key deletes nothing."""
    found = []
    for entry in os.scandir(self.directory):
      if entry.name.endswith(".tmp"):
        _remove(entry.path)
      elif entry.name.endswith(SUFFIX):
        try:
          key = bytes.fromhex(entry.name[:-len(SUFFIX)])
          stat = entry.stat()
        except (ValueError, OSError):
          continue
        if len(key) == 32:
          found.append((stat.st_mtime, key, stat.st_size))
    self._found = sorted(found)

  def _adopt(self, found) -> None:
    """Indexes files (mtime, key, size), oldest first, evicting past the capacity."""
    self._found = []
    for _, key, size in found:
      if size > self.capacity:
        _remove(self._path(key))
        continue
      while self.used + size > self.capacity:
        victim = self.replacement.victim()
        self._forget(victim)
        _remove(self._path(victim))
      self._index(key, size)

  def _path(self, key: bytes) -> str:
    return os.path.join(self.directory, key.hex() + SUFFIX)

  def _atomic_write(self, name: str, data: bytes) -> None:
    tmp = os.path.join(self.directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, os.path.join(self.directory, name))
    except BaseException:
      _remove(tmp)
      raise

  def _write(self, key: bytes, value: bytes) -> bool:
    try:
      self._atomic_write(key.hex() + SUFFIX, value)
      return True
    except OSError as e:
      self.failures += 1
      if e.errno not in self._reported:
        self._reported.add(e.errno)
        log.warning("disk tier: cannot write a chunk to %s (%s); serving from "
                    "the other tiers", self.directory, e.strerror or e)
      return False

  def _read(self, key: bytes) -> bytes | None:
    try:
      with open(self._path(key), "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None
    except OSError as e:
      log.warning("disk tier: cannot read %s (%s)", self._path(key), e.strerror)
      return None

  def _delete(self, key: bytes) -> None:
    with self._lock:
      if key in self._sizes:
        return
    _remove(self._path(key))


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
