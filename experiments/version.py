"""The code version recorded beside every result."""

from __future__ import annotations

import os
import pathlib
import subprocess

from lmcache_jax import __version__


def code_version() -> str:
  """The git commit (with '-dirty' for local changes), or the package version.

  ``LMCACHE_JAX_CODE_VERSION`` in the environment wins: a copy of the tree
  run elsewhere (a lent GPU machine) names the commit it was copied from.
  """
  if os.environ.get("LMCACHE_JAX_CODE_VERSION"):
    return os.environ["LMCACHE_JAX_CODE_VERSION"]
  root = pathlib.Path(__file__).parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=root, capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return __version__
