"""Which implementation a kernel wrapper runs, and the log line when it is
not the Pallas kernel."""

from __future__ import annotations

import contextlib
import functools
import logging

import jax

log = logging.getLogger("lmcache_jax.kernels")
_interpret_all = False


@contextlib.contextmanager
def interpret_mode():
  """Within this block (at trace time), wrappers called without ``interpret``
  run their Pallas kernels in interpret mode: how CPU tests exercise the
  kernels inside the model."""
  global _interpret_all
  before, _interpret_all = _interpret_all, True
  try:
    yield
  finally:
    _interpret_all = before


def interpreting() -> bool:
  """Whether ``interpret_mode`` is on (at trace time)."""
  return _interpret_all


@functools.lru_cache(maxsize=None)
def note(op: str, message: str) -> None:
  """Logs ``op: message`` once per process."""
  log.warning("%s: %s", op, message)


def choose(op: str, interpret: bool | None, fmt=None) -> str:
  """"triton", "interpret" or "reference" for ``op`` on the default backend.

  ``interpret=True`` runs the Pallas kernel in interpret mode anywhere (the
  CPU tests); otherwise GPUs get the Triton lowering and every other backend
  the pure-jnp reference, named once in the log. Formats without a kernel
  (``fmt.kind != "int"``: fp8) always run the reference, also logged.
  """
  if fmt is not None and fmt.kind != "int":
    note(op, f"no Pallas kernel for format {fmt.name}; running the pure-jnp "
              f"reference {op}_reference")
    return "reference"
  if interpret or (interpret is None and _interpret_all):
    return "interpret"
  backend = jax.default_backend()
  if backend == "gpu":
    return "triton"
  note(op, f"no Pallas lowering used on backend {backend!r}; running the "
            f"pure-jnp reference {op}_reference")
  return "reference"


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def floor_pow2(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)
