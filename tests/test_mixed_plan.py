"""Plans whose layers hold different widths (row pools shared by the
layers) through prefill, decode with eviction, and the prefix store."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.engine import calibration
from lmcache_jax.engine.generate import generate
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.quant.plan import QuantPlan
from lmcache_jax.store import DiskTier, KVStore, Layout
from lmcache_jax.store.keys import model_fingerprint
from policies.registry import EVICTION
from policies.replacement.lru import LRU
from store_helpers import tokens_for

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
# every width, a different mix in every layer: pools of int2 2 rows, int3 2,
# int4 3, int8 2 (one per head stored in the width)
MIXED = (("int2", "int3", "int4"), ("int8", "int8", "int2"),
          ("int4", "int4", "int3"))
# 8-bit formats only, also mixed (int8 6 rows, fp8 3): near-lossless, so a
# run can be held against the dense one
MIXED_8BIT = (("int8", "int8", "int8"), ("fp8", "int8", "fp8"),
               ("int8", "fp8", "int8"))


def plan(formats, **kw) -> QuantPlan:
  return QuantPlan.uniform(CFG, "int4", group_size=32, **kw).replace(
      formats=formats)


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, tiny_weights(CFG),
                                              jnp.float32))


def test_mixed_plans_pool_one_row_per_head_and_format():
  cache = init_cache(CFG, 2, 16, jnp.float32, quant=plan(MIXED))
  parts = {part.fmt.name: part for part in cache.keys.parts}
  heads = {name: np.asarray(p.heads[:, 0, :, 0]) for name, p in parts.items()}
  np.testing.assert_array_equal(heads["int2"], [[0], [2], [-1]])
  np.testing.assert_array_equal(heads["int4"], [[2, -1], [-1, -1], [0, 1]])
  np.testing.assert_array_equal(heads["int8"], [[-1, -1], [0, 1], [-1, -1]])
  np.testing.assert_array_equal(parts["int4"].first, [0, 1, 1])
  np.testing.assert_array_equal(parts["int2"].first, [0, 1, 2])
  assert calibration.rows_of(MIXED) == {
      name: p.data.shape[1] for name, p in parts.items()}
  for name, part in parts.items():
    layer, head = (np.asarray(a) for a in qpayload.pool_sources(part))
    assert [MIXED[l][h] for l, h in zip(layer, head)] == [name] * len(layer)
    assert len(set(zip(layer, head))) == len(layer)


@pytest.mark.parametrize("name", ["sliding_window", "h2o"])
def test_mixed_plan_tracks_dense_under_eviction(lm, name):
  """Decoding far past the budget, evicting every step, an 8-bit mixed plan
  reads every head from its own row: its logits are no further from the
  dense cache's than those of a plan storing every head in the noisier of
  its two formats (a head read from another head's row would be)."""
  policy = EVICTION.make(name, budget=8, evict_every=1)
  prompts = [tokens_for(5, 21), tokens_for(6, 9)]

  def run(formats):
    kw = {} if formats is None else {"new_cache": lambda b, s: init_cache(
        CFG, b, s, jnp.float32, quant=plan(formats, residual=2, sinks=1))}
    return generate(lm, prompts, max_new_tokens=12, policy=policy,
                    prefill_chunk=4, stop_tokens=(), **kw)

  dense, mixed = run(None), run(MIXED_8BIT)
  gap = lambda r: np.abs(r.prompt_logits - dense.prompt_logits).max()  # noqa: E731
  noisiest = max(gap(run(((f,) * 3,) * 3)) for f in ("int8", "fp8"))
  assert 0 < gap(mixed) <= noisiest
  np.testing.assert_array_equal(np.asarray(mixed.cache.live_slots()), 8)
  if name == "sliding_window":   # positions alone decide what it keeps
    np.testing.assert_array_equal(mixed.cache.positions,
                                  dense.cache.positions)


def test_mixed_plan_decodes_with_eviction(lm):
  policy = EVICTION.make("h2o", budget=8, evict_every=1)
  quant = plan(MIXED, residual=2, sinks=1, copy_bits=8, rotate=True)
  result = generate(lm, [tokens_for(7, 19)], max_new_tokens=20, policy=policy,
                    prefill_chunk=4, stop_tokens=(), sampling=Sampling(1.0),
                    key=jax.random.key(0),
                    new_cache=lambda b, s: init_cache(CFG, b, s, jnp.float32,
                                                      quant=quant))
  np.testing.assert_array_equal(np.asarray(result.cache.live_slots()), 8)
  assert len(result.tokens[0]) == 20
  assert np.all(np.isfinite(result.prompt_logits))


def test_mixed_plan_through_the_store(lm, tmp_path):
  """Chunks of a mixed plan's cache are stored and loaded back exactly (no
  exact copies: a loaded prefix reads its sinks and window as stored, by
  design, docs/store.md)."""
  quant = plan(MIXED, rotate=True)
  new_cache = lambda b, s: init_cache(CFG, b, s, jnp.float32, quant=quant)  # noqa: E731
  shapes = dict(capacity=96, prefill_chunk=8)
  prompt = tokens_for(8, 41)
  store = KVStore(Layout.of(new_cache(1, 16)),
                  [DiskTier(str(tmp_path), 1 << 20, LRU())],
                  model_fingerprint=model_fingerprint(lm), chunk_size=8)
  cold = generate_with_store(lm, [prompt], store, max_new_tokens=4,
                             new_cache=new_cache, **shapes)
  store.flush()
  warm = generate_with_store(lm, [prompt], store, max_new_tokens=4,
                             new_cache=new_cache, **shapes)
  assert warm.sources == [{"disk": 5}]
  assert warm.generation.tokens == cold.generation.tokens
  np.testing.assert_allclose(warm.generation.prompt_logits,
                             cold.generation.prompt_logits, rtol=1e-5,
                             atol=1e-5)
