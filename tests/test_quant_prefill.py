"""A chunked prefill over a packed cache computes what a decode loop does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax import attention
from lmcache_jax.attention.packed_prefill import attend_packed_prefill
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.cache.step import Step
from lmcache_jax.engine import steps
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.quant.plan import QuantPlan

pytestmark = pytest.mark.gpu   # python -m pytest -m gpu -n 0, on a GPU
CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
MIXED = (("int4", "int2", "int4"), ("int2", "int4", "int4"),
         ("int3", "int4", "int8"))
SHIFT = np.zeros((3, 3, 32), np.float32)
SHIFT[:, :, :4] = np.random.default_rng(9).standard_normal((3, 3, 4)) * 3
TOKENS = np.random.default_rng(4).integers(2, CFG.vocab_size, 23).astype(
    np.int32)


def make_plan(residual, sinks, copy_bits):
  return QuantPlan(MIXED, np.ones((3, 3, 32), np.float32), 32, residual,
                   sinks, "", True, SHIFT, copy_bits)


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, tiny_weights(CFG),
                                              jnp.float32))


def decode_nll(lm, plan):
  """NLL of TOKENS[1:], one decode step per token, and the cache after."""
  cache = init_cache(CFG, 1, 32, jnp.float32, quant=plan)
  nll = []
  for t, token in enumerate(TOKENS[:-1]):
    _, logits, cache = steps.decode_step(
        lm.graphdef, lm.params, cache, jnp.array([token]), jnp.ones(1, bool),
        jax.random.key(0), policy=KeepAll(), sampling=Sampling())
    nll.append(-jax.nn.log_softmax(logits[0])[TOKENS[t + 1]])
  return np.array(nll), cache


def chunked_nll(lm, plan, chunk):
  """NLL of TOKENS[1:] fed ``chunk`` tokens a pass, and the cache after."""
  cache = init_cache(CFG, 1, 32, jnp.float32, quant=plan)
  nll = []
  for start in range(0, len(TOKENS) - 1, chunk):
    piece = np.zeros(chunk, np.int32)
    target = np.zeros(chunk, np.int32)
    real = len(TOKENS[start:start + chunk][:len(TOKENS) - 1 - start])
    piece[:real] = TOKENS[start:start + real]
    target[:real] = TOKENS[start + 1:start + 1 + real]
    out, cache = steps.forward_nll(
        lm.graphdef, lm.params, cache, jnp.asarray(piece[None]),
        jnp.array([real]), jnp.asarray(target[None]), policy=KeepAll())
    nll.append(np.asarray(out[0, :real]))
  return np.concatenate(nll), cache


@pytest.mark.parametrize("residual,sinks,copy_bits,chunks", [
    (5, 2, 16, (3, 8, 22)), (4, 1, 8, (8,)), (0, 0, 16, (8,))])
def test_chunked_prefill_equals_decode_loop(lm, residual, sinks, copy_bits,
                                            chunks):
  plan = make_plan(residual, sinks, copy_bits)
  want, _ = decode_nll(lm, plan)
  for chunk in chunks:
    np.testing.assert_allclose(chunked_nll(lm, plan, chunk)[0], want,
                               rtol=0, atol=2e-5, err_msg=f"chunk {chunk}")


_write = jax.jit(attention.write_stacked)
_attend = jax.jit(attend_packed_prefill, static_argnums=6)


def test_prefill_mass_sums_to_the_weighted_heads():
  """Each real query spreads one unit of mass per head over the slots."""
  plan = make_plan(4, 2, 8)
  rng = np.random.default_rng(1)
  cache = init_cache(CFG, 2, 32, jnp.float32, quant=plan)
  stacked = attention.LayerKV(cache.keys, cache.values, cache.positions,
                              cache.scores)
  for start, steps_ in ((0, 7), (7, 9)):
    pos = start + np.arange(steps_, dtype=np.int32)
    pos = np.stack([pos, np.where(pos < start + 5, pos, -1)])
    shape = (2, steps_, 3, 32)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for _ in range(2))
    q = jnp.asarray(rng.standard_normal((2, steps_, 6, 32)), jnp.float32)
    slots = jnp.broadcast_to(jnp.asarray(np.where(pos >= 0, pos, 32))[:, None],
                             (2, 3, steps_))
    weights = jnp.asarray(pos >= 0, jnp.float32)
    step = Step(jnp.asarray(pos), jnp.asarray(np.maximum(pos, 0)), slots,
                weights)
    before = None if start == 0 else attention.layer_of(stacked, 1)
    stacked = _write(stacked, 1, k, v, step.positions, slots)
    out, mass = _attend(q, k, v, before, attention.layer_of(stacked, 1), step,
                        True)
    np.testing.assert_allclose(np.asarray(mass).sum(-1),
                               2 * weights.sum(-1)[:, None] * np.ones(3),
                               rtol=1e-5)
    assert np.all(np.asarray(out)[pos < 0] == 0)
