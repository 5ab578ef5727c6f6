"""Passkey and needle prompts, answer matching, and the retrieval tasks end to end."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from experiments.context import RunContext
from experiments.tasks.passkey import passkey as passkey_task
from lmcache_jax.data import needle as needle_data
from lmcache_jax.data import passkey as passkey_data
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.llama import from_weights
from policies.registry import EVICTION


class CharTokenizer:
  """One token per character (printable ASCII and newline): lengths are exact
  and easy to reason about."""
  vocab = "\n" + "".join(chr(c) for c in range(32, 127))

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    del add_bos  # The model asks for none.
    return [self.vocab.index(c) + 1 for c in text]

  def decode(self, ids, skip_special: bool = False) -> str:
    del skip_special
    return "".join(self.vocab[i - 1] for i in ids if 1 <= i <= len(self.vocab))


TOK = CharTokenizer()
PLAY = "".join(f"LINE {i}. To be, or not to be, that is the question.\n"
               for i in range(200))


@pytest.mark.parametrize("length, depth", [(400, 0.0), (400, 0.5), (700, 1.0)])
def test_passkey_prompt_has_the_length_and_depth_asked(length, depth):
  sample = passkey_data.passkey(TOK, length, depth, seed=3)
  assert sample.num_tokens == length
  text = TOK.decode(sample.prompt)
  assert text.count(sample.answer) == 2 and len(sample.answer) == 5
  assert TOK.decode(sample.cue) == passkey_data.CUE
  needle_len = len(TOK.encode(passkey_data.NEEDLE.format(key=sample.answer)))
  room = length - needle_len - len(TOK.encode(passkey_data.INTRO)) - len(
      TOK.encode(passkey_data.QUESTION)) - len(sample.cue)
  intro = len(TOK.encode(passkey_data.INTRO))
  assert sample.needle_start == intro + round(depth * room)
  assert TOK.decode(sample.prompt[sample.needle_start:]).startswith(
      " The pass key is " + sample.answer)


def test_passkey_is_reproducible_from_its_seed():
  a, b = (passkey_data.passkey(TOK, 300, 0.3, seed=11) for _ in range(2))
  assert a == b
  assert passkey_data.passkey(TOK, 300, 0.3, seed=12).answer != a.answer


@pytest.mark.parametrize("length, depth, match", [
    (300, 1.5, "depth must be in"), (300, -0.1, "depth must be in"),
    (40, 0.5, "cannot hold")])
def test_passkey_bad_requests(length, depth, match):
  with pytest.raises(ValueError, match=match):
    passkey_data.passkey(TOK, length, depth, seed=0)


@pytest.mark.parametrize("depth", [0.0, 0.4, 0.9])
def test_needle_sits_on_a_line_boundary_of_the_real_text(depth):
  sample = needle_data.needle(TOK, PLAY, 900, depth, seed=2)
  assert sample.num_tokens == 900
  assert sample.answer in needle_data.WORDS
  text = TOK.decode(sample.prompt)
  assert text.count(f"secret word is {sample.answer}.") == 1
  before = TOK.decode(sample.prompt[:sample.needle_start])
  assert before.endswith("\n")
  assert needle_data.needle(TOK, PLAY, 900, depth, seed=2) == sample


def test_needle_needs_a_text():
  with pytest.raises(ValueError, match="empty"):
    needle_data.needle(TOK, "", 300, 0.5, seed=0)


@pytest.mark.parametrize("text, want", [
    (" 12345.\n", True), ("12345", True), (' "12345" is', True),
    (" 123456", False), (" 1234", False), (" The key: 12345", False),
    (" Walrus!", True)])
def test_first_answer(text, want):
  answer = "walrus" if "alrus" in text else "12345"
  assert passkey_data.first_answer(text, answer) is want


def retrieval_config(mode):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.passkey = ml_collections.ConfigDict(dict(
      lengths=(300,), depths=(0.2, 0.8), trials=1, digits=3, max_new_tokens=3,
      chunk=64, mode=mode))
  return config


@pytest.mark.parametrize("mode", ["prefill", "stream"])
def test_passkey_task_runs_under_an_evicting_policy(mode):
  cfg = tiny_config(vocab_size=len(CharTokenizer.vocab) + 2)
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                            jnp.float32), tokenizer=TOK)
  policy = EVICTION.make("snapkv", budget=48, window=4).bind(cfg)
  ctx = RunContext(config=retrieval_config(mode), lm=lm, policy=policy)
  results = passkey_task(ctx)
  assert results["trials"] == 2 and 0.0 <= results["accuracy"] <= 1.0
  # snapkv keeps every token after the compression: the cue and the answer.
  assert results["decode_eviction"] == "never"
  cue = len(passkey_data.CUE)
  assert results["live_slots_max"] == 48 + cue + 3 - 1
  if mode == "stream":
    assert results["cache_capacity"] == 48 + 64
  else:   # compacted after prefill: the budget, then the cue and answer
    assert results["cache_capacity"] == 48 + cue + 3
  again = passkey_task(ctx)
  assert again["decode_eviction"] == "never"
  assert [s["output"] for s in again["samples"]] == [
      s["output"] for s in results["samples"]]
  assert np.isclose(again["accuracy"], results["accuracy"])


def test_passkey_task_states_a_budget_holding_decode_mode():
  cfg = tiny_config(vocab_size=len(CharTokenizer.vocab) + 2)
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                            jnp.float32), tokenizer=TOK)
  policy = EVICTION.make("h2o", budget=48).bind(cfg)
  ctx = RunContext(config=retrieval_config("prefill"), lm=lm, policy=policy)
  results = passkey_task(ctx)
  assert results["decode_eviction"] == "every step"
  assert results["live_slots_max"] == 48
