"""RULER's aggregation tasks: common-word and frequent-word extraction.

Common words (``cwe``): a numbered list ``1. word 2. word ...`` in which ten
words occur ``freq_common`` times each and the rest ``freq_rare`` times; the
answer is the ten. RULER's frequencies and one-shot example: below 4,096
tokens 6 and 1 times (example of 20 words, 3 and 1), else 30 and 3 (example
of 40 words, 10 and 3). The words are those of the real text (RULER's come
from ``wonderwords``).

Frequent words (``fwe``): coded words of 6 seeded letters, the word of rank
``k`` occurring ``int(n * k**-alpha / zeta(alpha))`` times (Zipf, RULER's
alpha 2); rank 1 is the noise ``....``, the answer ranks 2 to 4.

Both fill the prompt with as many words as fit in ``length`` tokens.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import numpy as np
from scipy import special

from lmcache_jax.data.passkey import Tokenizer
from lmcache_jax.data.ruler.prompt import RulerSample

CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some "
                   "appear more often than others. Memorize the ones that "
                   "appear most often.\n")
CWE_QUESTION = ("\nQuestion: What are the {count} most common words in the "
                "above list?")
CWE_ANSWER_PREFIX = (" Answer: The top {count} words that appear most often "
                     "in the list are:")
COMMON_WORDS = 10

FWE_INSTRUCTION = ("Read the following coded text and track the frequency of "
                   "each coded word. Find the three most frequently appeared "
                   "coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared "
                "words in the above coded text?")
FWE_ANSWER_PREFIX = (" Answer: According to the coded text above, the three "
                     "most frequently appeared words are:")
NOISE = "...."
ALPHA = 2.0
CODED_LETTERS = 6


def numbered(words: list[str]) -> str:
  return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def text_vocabulary(text: str) -> list[str]:
  """The lower-case words of 4 to 12 letters in ``text`` that the task's own
  sentences do not use, sorted."""
  template = " ".join((CWE_INSTRUCTION, CWE_QUESTION, CWE_ANSWER_PREFIX))
  own = set(re.findall(r"[a-z]+", template.lower()))
  return sorted(set(re.findall(r"\b[a-z]{4,12}\b", text)) - own)


def apart(words: list[str], count: int) -> tuple[list[str], list[str]]:
  """The first ``count`` of ``words`` none of which holds another, and the
  rest of ``words`` without those holding one of them: RULER matches answers
  as substrings, so no other word may earn an answer's credit (``bell`` in
  ``bells``)."""
  chosen = []
  for word in words:
    if len(chosen) == count:
      break
    if not any(word in c or c in word for c in chosen):
      chosen.append(word)
  rest = [w for w in words if not any(c in w for c in chosen)]
  return chosen, rest


def word_list(words: list[str], common: int, freq_common: int,
              freq_rare: int, rng: np.random.Generator) -> list[str]:
  """``words[:common]`` ``freq_common`` times each and the rest
  ``freq_rare`` times each, in a seeded order."""
  listed = words[:common] * freq_common + words[common:] * freq_rare
  return [listed[i] for i in rng.permutation(len(listed))]


def most_that_fit(build: Callable[[int], RulerSample], low: int, high: int,
                  length: int) -> tuple[int, RulerSample]:
  """The largest ``n`` in [low, high] whose prompt ``build(n)`` has at most
  ``length`` tokens, and that prompt (bisection on a size that grows with
  ``n``)."""
  best = build(low)
  if best.num_tokens > length:
    raise ValueError(f"a prompt of {length} tokens is too short for this "
                     f"task ({best.num_tokens} tokens at its smallest); ask "
                     f"for more")
  while low < high:
    mid = (low + high + 1) // 2
    sample = build(mid)
    if sample.num_tokens <= length:
      low, best = mid, sample
    else:
      high = mid - 1
  return low, best


def common_words(tokenizer: Tokenizer, text: str, length: int,
                 seed: int) -> RulerSample:
  """A ``cwe`` prompt of at most ``length`` tokens, reproducible from
  ``seed``; its words come from ``text``."""
  vocabulary = text_vocabulary(text)
  small = length < 4096
  example_words, (freq_common, freq_rare), example_freqs = (
      (20, (6, 1), (3, 1)) if small else (40, (30, 3), (10, 3)))
  order = np.random.default_rng(seed).permutation(len(vocabulary))
  common, others = apart([vocabulary[i] for i in order], COMMON_WORDS)
  if len(common) < COMMON_WORDS or len(others) <= example_words:
    raise ValueError(f"the text has {len(vocabulary)} distinct words of 4 to "
                     f"12 letters; cwe needs more than "
                     f"{example_words + COMMON_WORDS}")
  example, rare = others[:example_words], others[example_words:]
  pool = common + rare
  question = tokenizer.encode(CWE_QUESTION.format(count=COMMON_WORDS),
                              add_bos=False)
  prefix_text = CWE_ANSWER_PREFIX.format(count=COMMON_WORDS)
  prefix = tokenizer.encode(prefix_text, add_bos=False)
  shot = (CWE_INSTRUCTION
          + numbered(word_list(example, COMMON_WORDS, *example_freqs,
                               np.random.default_rng([seed, 0])))
          + CWE_QUESTION.format(count=COMMON_WORDS) + prefix_text + " "
          + numbered(example[:COMMON_WORDS]) + "\n")

  def build(num_words: int) -> RulerSample:
    listed = word_list(pool[:num_words], COMMON_WORDS, freq_common,
                       freq_rare, np.random.default_rng([seed, num_words]))
    context = tokenizer.encode(shot + CWE_INSTRUCTION + numbered(listed))
    return RulerSample("cwe", context, question, prefix,
                       tuple(pool[:COMMON_WORDS]))

  return most_that_fit(build, COMMON_WORDS + 1, len(pool), length)[1]


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> np.ndarray:
  """RULER's counts: rank ``k`` (from 1) occurs ``int(n k^-alpha /
  zeta(alpha))`` times."""
  ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
  return (num_words * ranks ** -alpha / special.zeta(alpha)).astype(int)


def frequent_words(tokenizer: Tokenizer, text: str, length: int,
                   seed: int, alpha: float = ALPHA) -> RulerSample:
  """An ``fwe`` prompt of at most ``length`` tokens, reproducible from
  ``seed`` (``text`` is not read: the words are coded)."""
  del text
  if alpha <= 1:
    raise ValueError(f"alpha must be > 1 (a Zipf law), got {alpha}")
  rng = np.random.default_rng(seed)
  vocab_size = max(length // 50, 5)   # RULER's default vocabulary
  coded: set[str] = set()
  while len(coded) < vocab_size - 1:
    coded.add("".join(rng.choice(list(string.ascii_lowercase),
                                 CODED_LETTERS)))
  coded_sorted = sorted(coded)
  vocab = [NOISE] + [coded_sorted[i] for i in rng.permutation(len(coded))]
  question = tokenizer.encode(FWE_QUESTION, add_bos=False)
  prefix = tokenizer.encode(FWE_ANSWER_PREFIX, add_bos=False)

  def build(num_words: int) -> RulerSample:
    counts = zipf_counts(num_words, vocab_size, alpha)
    listed = [w for w, c in zip(vocab, counts) for _ in range(c)]
    listed = [listed[i] for i in
              np.random.default_rng([seed, num_words]).permutation(len(listed))]
    context = tokenizer.encode(FWE_INSTRUCTION + " ".join(listed))
    return RulerSample("fwe", context, question, prefix, tuple(vocab[1:4]))

  num_words, sample = most_that_fit(build, 1, 2 * length, length)
  counts = zipf_counts(num_words, vocab_size, alpha)
  if counts[3] <= counts[4]:
    raise ValueError(f"a prompt of {length} tokens holds too few words for "
                     f"three most frequent ones ({counts[1:5].tolist()} "
                     f"times); ask for more tokens")
  return sample
