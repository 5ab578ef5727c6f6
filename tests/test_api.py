"""The Python API (lmcache_jax.api) on a tiny random model and the real one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from configs import default
from experiments import run, setup
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


def tiny_model(head_dim: int) -> api.Model:
  cfg = tiny_config(head_dim=head_dim)  # int packing needs multiples of 32
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32),
                               _Bytes(cfg.vocab_size), "tiny")
  return api.Model(lm)


@pytest.fixture(scope="module")
def model():
  return tiny_model(32)


@pytest.fixture(scope="module")
def wide():
  """Head dim 64: the default plan's groups of 64 channels fit."""
  return tiny_model(64)


def assert_same_plan(a: QuantPlan, b: QuantPlan) -> None:
  for name in ("formats", "group_size", "residual", "sinks", "policy",
               "rotate", "copy_bits", "outliers", "key_layout", "key_group"):
    assert getattr(a, name) == getattr(b, name), name
  np.testing.assert_array_equal(a.key_scale, b.key_scale)
  np.testing.assert_array_equal(a.key_shift, b.key_shift)


def cli_config(**fields):
  """configs/default.py with ``fields`` (dotted names) set, as flags would."""
  config = default.get_config().unlock()
  for name, value in fields.items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config.lock()


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


def test_store_hit_reuses_whole_chunks_and_gives_the_same_answer(model):
  prompt = "A long shared document. " * 4    # 96 tokens (bytes)
  cold = model.generate(prompt, max_new_tokens=4)
  assert (cold.prompt_tokens, cold.reused_tokens) == (96, 0)
  stored = api.Model(model.lm)
  stored.store = stored.make_store([HostTier(2**24, REPLACEMENT.make("lru"))],
                                   chunk_size=16)
  first = stored.generate(prompt, max_new_tokens=4)
  assert first == cold and first.reused_tokens == 0
  # the last prompt token is always computed: 5 whole chunks of 16 of the
  # first 95 tokens come from the store
  again = stored.generate(prompt, max_new_tokens=4)
  assert again == cold and again.reused_tokens == 80
  assert stored.store.stats["hit_host"] == 5
  # a prompt sharing 40 tokens of that prefix reuses its 2 whole chunks
  other = stored.generate(prompt[:40] + "Something else entirely.",
                          max_new_tokens=4)
  assert other.reused_tokens == 32


def test_the_api_builds_the_command_lines_plan(wide):
  """``kv_bits=4`` in Python, ``--kv_bits=4`` on the command line, and a
  config that leaves the quant fields out: one plan."""
  plan = wide.plan(4.0)
  assert (plan.group_size, plan.residual, plan.sinks, plan.copy_bits) == (
      64, 32, 4, 8)
  assert plan.rotate and plan.policy == "uniform"
  assert_same_plan(setup.make_quant(cli_config(**{"quant.kv_bits": 4.0}),
                                    wide.lm), plan)
  assert_same_plan(setup.quant_plan({"kv_bits": 4}, wide.lm), plan)
  assert_same_plan(wide.plan(4), plan)
  flags = {"quant.kv_bits": 3.0, "quant.group_size": 32, "quant.residual": 16,
           "quant.sinks": 2, "quant.copy_bits": 16}
  assert_same_plan(setup.make_quant(cli_config(**flags), wide.lm),
                   wide.plan(3, group_size=32, residual=16, sinks=2,
                             copy_bits=16))


def test_the_api_and_the_command_line_give_the_same_answer(wide):
  config = cli_config(**{"task": "generate", "model": "tiny", "context": 128,
                         "quant.kv_bits": 4.0,
                         "policy.name": "h2o", "policy.budget": 16.0,
                         "generate.prompt": "Hello there, model.",
                         "generate.max_new_tokens": 8})
  cli = run.run(config, wide.lm)
  h2o = EVICTION.make("h2o", budget=16)
  answer = wide.generate("Hello there, model.", kv_bits=4.0, max_new_tokens=8,
                         policy=h2o)
  assert answer == cli["answer"] and len(answer) == 8
  assert answer == wide.generate("Hello there, model.", kv_bits=4,
                                 max_new_tokens=8, policy=h2o)


def test_a_budget_larger_than_the_prompt_is_an_error_in_both(model):
  """19 prompt tokens + 5 new = 24: a budget of 25 evicts nothing."""
  with pytest.raises(ValueError, match=r"policy 'attention_sink': budget 25 "
                     r"tokens is larger than the prompt and the tokens it may "
                     r"add \(19 \+ 5 = 24\); use a budget of at most 24, or "
                     r"KeepAll\(\)"):
    model.generate("Hello there, model.", max_new_tokens=5,
                   policy=EVICTION.make("attention_sink", budget=25))
  config = cli_config(**{"task": "generate", "model": "tiny", "context": 128,
                         "policy.name": "attention_sink", "policy.budget": 25.0,
                         "generate.prompt": "Hello there, model.",
                         "generate.max_new_tokens": 5})
  with pytest.raises(ValueError, match="budget 25 tokens is larger"):
    run.build_context(config, model.lm)
  assert model.generate("Hello there, model.", max_new_tokens=5,
                        policy=EVICTION.make("attention_sink", budget=24))


def test_clear_errors(model):
  with pytest.raises(ValueError, match="prompt is empty"):
    model.generate("  ")
  with pytest.raises(ValueError, match="holds"):
    model.perplexity("short", num_tokens=64)
  with pytest.raises(ValueError, match="not both"):
    model.generate("hi", kv_bits=4,
                   quant=QuantPlan.uniform(model.lm.cfg, "int4", group_size=32))
  with pytest.raises(ValueError, match=r"kv_bits=4.5 is not available: use 2, "
                     r"3, 4 or 8 \(a uniform plan\), 16 for an unquantized"):
    model.generate("hi", kv_bits=4.5)
  with pytest.raises(ValueError, match="group_size=64 must divide head_dim=32"):
    model.plan(4)
  bare = api.Model(LoadedModel(**{**model.lm.__dict__, "tokenizer": None}))
  with pytest.raises(ValueError, match="no tokenizer"):
    bare.generate("hi")


@pytest.mark.real_model
def test_real_model_readme_example():
  from lmcache_jax.data import shakespeare
  model = api.load("smollm2-135m", jnp.float32)
  snapkv = EVICTION.make("snapkv", budget=48)   # of 34 + 24 tokens
  answer = model.generate("Name three planets.", policy=snapkv, kv_bits=4,
                          max_new_tokens=24)
  assert answer.startswith("1. Earth: The only planet in our solar system")
  assert (answer.prompt_tokens, answer.reused_tokens) == (34, 0)
  ppl = model.perplexity(shakespeare.load_text("hamlet"), num_tokens=256,
                         policy=EVICTION.make("attention_sink", budget=128))
  assert ppl == pytest.approx(16.390, rel=1e-3)
