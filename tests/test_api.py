"""The Python API (lmcache_jax.api) on a tiny random model and the real one."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax import api
from lmcache_jax.models import LoadedModel
from lmcache_jax.models.llama import from_weights
from lmcache_jax.quant import QuantPlan
from lmcache_jax.store import HostTier
from policies import EVICTION, REPLACEMENT

TEXT = "It was the best of times, it was the worst of times. " * 8


class _Bytes:
  """Bytes modulo the vocabulary, with no chat template."""
  chat_template = None

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text, add_bos=False):
    del add_bos
    return [2 + b % (self.vocab_size - 2) for b in text.encode()]

  def decode(self, ids, skip_special=True):
    del skip_special
    return bytes(i % 256 for i in ids).decode("latin-1")


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(head_dim=32)  # int packing needs multiples of 32
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32),
                               _Bytes(cfg.vocab_size), "tiny")
  return api.Model(lm)


def test_generate_with_policy_and_quantization(model):
  sink = EVICTION.make("attention_sink", budget=24)
  plan = QuantPlan.uniform(model.lm.cfg, "int4", rotate=True, group_size=32)
  for kwargs in ({}, {"policy": sink}, {"quant": plan}):
    answer = model.generate("Hello there, model.", max_new_tokens=5, **kwargs)
    assert isinstance(answer, str) and len(answer) > 0


def test_perplexity_budget_never_reached_equals_full(model):
  full = model.perplexity(TEXT, num_tokens=64, chunk=16)
  roomy = model.perplexity(TEXT, num_tokens=64, chunk=16,
                           policy=EVICTION.make("attention_sink", budget=64))
  small = model.perplexity(TEXT, num_tokens=64, chunk=16,
                           policy=EVICTION.make("attention_sink", budget=24))
  assert roomy == pytest.approx(full, rel=1e-5)
  assert small != pytest.approx(full, rel=1e-6)


def test_store_gives_the_same_answer(model):
  prompt = "A long shared document. " * 4
  cold = model.generate(prompt, max_new_tokens=4)
  stored = api.Model(model.lm)
  stored.store = stored.make_store([HostTier(2**24, REPLACEMENT.make("lru"))],
                                   chunk_size=16)
  assert stored.generate(prompt, max_new_tokens=4) == cold
  assert stored.generate(prompt, max_new_tokens=4) == cold  # from the store
  assert stored.store.describe()


def test_clear_errors(model):
  with pytest.raises(ValueError, match="prompt is empty"):
    model.generate("  ")
  with pytest.raises(ValueError, match="holds"):
    model.perplexity("short", num_tokens=64)
  with pytest.raises(ValueError, match="not both"):
    model.generate("hi", kv_bits=4,
                   quant=QuantPlan.uniform(model.lm.cfg, "int4", group_size=32))
  bare = api.Model(LoadedModel(**{**model.lm.__dict__, "tokenizer": None}))
  with pytest.raises(ValueError, match="no tokenizer"):
    bare.generate("hi")


@pytest.mark.real_model
def test_real_model_readme_example():
  from lmcache_jax.data import shakespeare
  model = api.load("smollm2-135m", jnp.float32)
  snapkv = EVICTION.make("snapkv", budget=64)
  answer = model.generate("Name three planets.", policy=snapkv, kv_bits=4,
                          max_new_tokens=24)
  assert any(p in answer for p in ("Mars", "Venus", "Jupiter", "Earth"))
  ppl = model.perplexity(shakespeare.load_text("hamlet"), num_tokens=256,
                         policy=EVICTION.make("attention_sink", budget=128))
  assert 1 < ppl < 100
