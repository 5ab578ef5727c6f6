"""Progress bars and status lines, under one rule for the library and the harness.

A bar is ``tqdm.auto``'s, as the perplexity task draws it: a text bar on
stderr (a widget in a notebook) that leaves no line behind, hidden when
stderr is not a terminal (tqdm's ``disable=None``). Once logging is
configured, bars and status lines also stay hidden while the
``lmcache_jax`` logger is quieter than INFO, so the logging level is the
quiet switch: ``python -m experiments.run`` runs at INFO (absl's
``--verbosity=0``) and ``--verbosity=-1`` silences them. A script or
notebook that configures no logging shows them, as tqdm would.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOGGER = "lmcache_jax"


def enabled() -> bool:
  """Whether progress is shown at all: logging is not configured (the root
  logger has no handler), or the ``lmcache_jax`` logger is at INFO or more
  verbose."""
  return (not logging.getLogger().handlers
          or logging.getLogger(LOGGER).isEnabledFor(logging.INFO))


def bar(iterable=None, **kwargs) -> tqdm:
  """``tqdm(iterable, **kwargs)`` under this module's rule (``leave=False``
  and ``disable=None`` unless given; always disabled when not ``enabled``)."""
  kwargs.setdefault("leave", False)
  kwargs.setdefault("disable", None)
  if not enabled():
    kwargs["disable"] = True
  return tqdm(iterable, **kwargs)


def status(text: str, *, end: str = "\n") -> None:
  """Writes ``text`` to stderr when ``enabled`` (flushed: a status line can
  be finished later, e.g. ``status("downloading x… ", end="")`` then
  ``status("done")``)."""
  if enabled():
    sys.stderr.write(text + end)
    sys.stderr.flush()
