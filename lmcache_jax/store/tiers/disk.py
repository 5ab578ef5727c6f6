"""The disk tier: one file per chunk, written atomically and durably.

The tier touches only its own files in its directory:
  ``<key hex>.kv``                     a chunk
  ``store.json``                       whether the chunks are encrypted, and a
                                       check value of the key
  ``.lmcache.lock``                    the directory lock (``flock``), held
                                       briefly around every change: the scan
                                       at start, a rename into place, a
                                       deletion, ``store.json``
  ``.lmcache-<owner>.owner``           held locked by a live tier
  ``.lmcache-<owner>-<random>.tmp``    a file that tier is writing

A file is written under a temporary name, fsynced, renamed into place and the
directory fsynced, so a reader sees a whole file or none and a file in place
survives a crash. At start, the temporaries of tiers whose owner file is
unlocked (their process is gone) are removed; nothing else is.

Several processes may share a directory. Each indexes the chunk files there
at its start and those it writes, and bounds what it indexes by its capacity
(n processes hold at most n times it). It deletes a chunk file only if it is
the very file it last wrote or read (same inode and modification time; a read
touches the file): a file another process has written or used since is left
to that process. A chunk deleted by another process is a miss, never an error.

``store.json`` is written once, under the lock. A store opened with another
key (or none) fails with a clear error; so does an unreadable ``store.json``,
or chunk files without one: the tier never guesses whether chunks are
encrypted, since a wrong guess would drop every one of them on read.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import uuid
import weakref

from lmcache_jax.store.tier import Replacement, Tier, log

SUFFIX = ".kv"
META = "store.json"
LOCK = ".lmcache.lock"
_OWNED = re.compile(r"\.lmcache-(?P<owner>[0-9a-f]{32})"
                    r"(?P<kind>\.owner|-[0-9a-f]{32}\.tmp)")


class DiskTier(Tier):
  """Chunk files under ``directory``, up to ``capacity`` bytes of them.

  ``close`` (or the owning store's) releases the directory; a closed tier
  cannot be used again.
  """
  name = "disk"

  def __init__(self, directory: str, capacity: int, replacement: Replacement):
    super().__init__(capacity, replacement)
    if not isinstance(directory, str) or not directory:
      raise ValueError(f"the disk tier needs a directory (a path), got "
                       f"{directory!r}")
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.owner = uuid.uuid4().hex
    # per indexed key: (inode, mtime in ns) of the file this tier last wrote
    # or read; only that file may be deleted
    self._files: dict[bytes, tuple[int, int]] = {}
    self._closed = False
    self._dir_lock, self._owner_fd = self._open_directory()
    self._finalizer = weakref.finalize(self, _close_fds, self._dir_lock.fd,
                                       self._owner_fd)
    with self._dir_lock:
      self._remove_stale_temporaries()
      self._found = self._scan()

  def _open_directory(self) -> tuple["_DirectoryLock", int]:
    """The directory lock, and this tier's owner file, created and locked."""
    try:
      os.makedirs(self.directory, exist_ok=True)
      lock = _DirectoryLock(os.path.join(self.directory, LOCK))
      with lock:
        fd = os.open(self._owner_path(self.owner),
                     os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
      return lock, fd
    except OSError as e:
      raise ValueError(f"the disk tier's directory {self.directory!r} is not "
                       f"writable ({e.strerror}); give a directory this "
                       f"process can create files in") from None

  def close(self) -> None:
    """Releases the directory: the owner file goes, the locks are closed."""
    if self._closed:
      return
    self._closed = True
    with self._dir_lock:
      _remove(self._owner_path(self.owner))
    self._finalizer()

  def check_key(self, key_check: str | None) -> None:
    if self._closed:
      raise ValueError(f"the disk tier at {self.directory!r} is closed; "
                       f"make a new DiskTier for the directory")
    mine = {"format": 1, "encrypted": key_check is not None,
            "key_check": key_check}
    with self._dir_lock:
      theirs = self._read_meta()
      if theirs is None:
        if self._found:
          raise ValueError(
              f"{self.directory!r} holds {len(self._found)} chunk files but no "
              f"{META}, which records whether they are encrypted; restore it, "
              f"or delete the *{SUFFIX} files to start afresh")
        self._atomic_write(META, json.dumps(mine).encode())
      elif theirs["encrypted"] != mine["encrypted"]:
        state = "encrypted" if theirs["encrypted"] else "not encrypted"
        raise ValueError(
            f"the store at {self.directory!r} is {state}; open it "
            f"{'with' if theirs['encrypted'] else 'without'} an encryption key")
      elif theirs["key_check"] != mine["key_check"]:
        raise ValueError(f"the encryption key does not match the one the "
                         f"store at {self.directory!r} was written with")
      self._adopt(self._found)

  def _read_meta(self) -> dict | None:
    """``store.json``'s record; None if there is none. Raises if unreadable."""
    path = os.path.join(self.directory, META)
    try:
      with open(path) as f:
        record = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      record = getattr(e, "strerror", None) or "not JSON"
    if not (isinstance(record, dict) and record.get("format") == 1
            and isinstance(record.get("encrypted"), bool)
            and "key_check" in record):
      raise ValueError(
          f"the disk store's {path!r} is unreadable ({str(record)[:60]}); it "
          f"says whether the chunks there are encrypted, so the store will not "
          f"guess: restore it, or delete {META} and the *{SUFFIX} files")
    return record

  def _remove_stale_temporaries(self) -> None:
    """Removes the temporaries (and owner files) of tiers no process holds."""
    owned: dict[str, list[str]] = {}
    for entry in os.scandir(self.directory):
      match = _OWNED.fullmatch(entry.name)
      if match and match["owner"] != self.owner:
        owned.setdefault(match["owner"], []).append(entry.path)
    for owner, paths in owned.items():
      if not _held(self._owner_path(owner)):
        for path in sorted(paths, key=lambda p: p.endswith(".owner")):
          _remove(path)

  def _scan(self) -> list:
    """Chunk files left by earlier runs, oldest first. They are adopted (and
    the oldest evicted past the capacity) only once ``check_key`` has
    accepted the directory: a wrong key deletes nothing."""
    found = []
    for entry in os.scandir(self.directory):
      if not entry.name.endswith(SUFFIX):
        continue
      try:
        key = bytes.fromhex(entry.name[:-len(SUFFIX)])
        stat = entry.stat()
      except (ValueError, OSError):
        continue
      if len(key) == 32:
        found.append((stat.st_mtime_ns, key, stat.st_size, _identity(stat)))
    return sorted(found)

  def _adopt(self, found) -> None:
    """Indexes files (mtime, key, size, identity), oldest first, evicting
    past the capacity."""
    self._found = []
    for _, key, size, identity in found:
      with self._lock:
        self._files[key] = identity
      if size > self.capacity:
        self._delete(key)
        continue
      while self.used + size > self.capacity:
        with self._lock:
          victim = self.replacement.victim()
          self._forget(victim)
        self._delete(victim)
      self._index(key, size)

  def _path(self, key: bytes) -> str:
    return os.path.join(self.directory, key.hex() + SUFFIX)

  def _owner_path(self, owner: str) -> str:
    return os.path.join(self.directory, f".lmcache-{owner}.owner")

  def _atomic_write(self, name: str, data: bytes) -> tuple[int, int]:
    """Writes ``name`` durably; returns its identity (inode, mtime)."""
    tmp = os.path.join(self.directory,
                       f".lmcache-{self.owner}-{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        identity = _identity(os.fstat(f.fileno()))
      with self._dir_lock:
        os.replace(tmp, os.path.join(self.directory, name))
        _fsync_directory(self.directory)
      return identity
    except BaseException:
      _remove(tmp)
      raise

  def _write(self, key: bytes, value: bytes) -> None:
    """Writes the chunk file; an ``OSError`` (a full disk, say) propagates."""
    identity = self._atomic_write(key.hex() + SUFFIX, value)
    with self._lock:
      self._files[key] = identity

  def _read(self, key: bytes) -> bytes | None:
    """The file's bytes; the read marks it used (see the module docstring)."""
    try:
      with open(self._path(key), "rb") as f:
        data = f.read()
        with self._dir_lock:
          os.utime(f.fileno())
          identity = _identity(os.fstat(f.fileno()))
    except FileNotFoundError:
      return None
    except OSError as e:
      log.warning("disk tier: cannot read %s (%s)", self._path(key), e.strerror)
      return None
    with self._lock:
      if key in self._sizes:
        self._files[key] = identity
    return data

  def _delete(self, key: bytes) -> None:
    with self._dir_lock, self._lock:
      if key in self._sizes:
        return
      identity = self._files.pop(key, None)
      path = self._path(key)
      try:
        if identity is not None and _identity(os.stat(path)) == identity:
          os.remove(path)
      except FileNotFoundError:
        pass


class _DirectoryLock:
  """An exclusive lock on a directory between processes (``flock`` on a file
  in it) and between threads; reentrant."""

  def __init__(self, path: str):
    self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    self._threads = threading.RLock()
    self._depth = 0

  def __enter__(self) -> None:
    self._threads.acquire()
    if self._depth == 0:
      try:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
      except BaseException:
        self._threads.release()
        raise
    self._depth += 1

  def __exit__(self, *exc) -> None:
    self._depth -= 1
    if self._depth == 0:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    self._threads.release()


def _held(owner_path: str) -> bool:
  """Whether a live tier holds the owner file at ``owner_path`` locked."""
  try:
    fd = os.open(owner_path, os.O_RDWR)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def _identity(stat: os.stat_result) -> tuple[int, int]:
  return stat.st_ino, stat.st_mtime_ns


def _fsync_directory(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _close_fds(*fds: int) -> None:
  for fd in fds:
    try:
      os.close(fd)
    except OSError:
      pass


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
