"""Bad input, told apart from faults of the code.

The command lines (``experiments.run``, ``experiments.sweep``) show an
``InputError`` as one line; any other error keeps its traceback.
"""

from __future__ import annotations

import contextlib


class InputError(ValueError):
  """A value the user gave (a flag, a config field, a file) that cannot work;
  the message names it and what would."""


@contextlib.contextmanager
def input_errors():
  """Within it (or on a function it decorates) a ValueError is about the
  input: it is raised again as an ``InputError``. For validation code only,
  whose every ValueError names a bad value."""
  try:
    yield
  except InputError:
    raise
  except ValueError as e:
    raise InputError(str(e)) from e
