"""The evaluation text: a Shakespeare play, the whole corpus, or any UTF-8 file."""

from __future__ import annotations

import pathlib

from experiments.errors import InputError
from lmcache_jax.data import shakespeare


def load_eval_text(text: str, text_file: str = "") -> str:
  """``text_file`` if given, else the Shakespeare text named ``text``
  (``corpus`` = all plays concatenated). A file must be UTF-8 prose: one
  that is empty or more than 1% control characters is an InputError."""
  if text_file:
    path = pathlib.Path(text_file)
    if not path.is_file():
      raise FileNotFoundError(f"--text_file {text_file!r} is not a file")
    try:
      content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise InputError(f"--text_file {text_file!r} is not UTF-8 text (byte "
                       f"{e.start}: {e.reason}); convert it, e.g. with iconv") from None
    if not content.strip():
      raise InputError(f"--text_file {text_file!r} is empty")
    control = sum(1 for c in content if not (c.isprintable() or c.isspace()))
    if control > 0.01 * len(content):
      raise InputError(f"--text_file {text_file!r} is not prose: "
                       f"{control / len(content):.0%} of its characters are "
                       f"control characters (NUL, escape codes); give plain text")
    return content
  if text == "corpus":
    return shakespeare.corpus()
  return shakespeare.load_text(text)
