"""The public prefill and decode refuse to feed a token the cache has no slot
for, exactly where the step would have dropped it (``engine.room``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.engine import decode, prefill, steps
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from policies.registry import EVICTION

PROMPT = np.random.default_rng(0).integers(2, 97, 24).tolist()


@pytest.fixture(scope="module")
def lm():
  cfg = tiny_config()
  return LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg),
                                              jnp.float32))


def snapkv(**fields):
  return EVICTION.make("snapkv", budget=8, window=2, **fields)


def empty(lm, capacity, batch=1):
  return init_cache(lm.cfg, batch, capacity, jnp.float32)


def live_positions(cache, seq=0):
  """The positions held in layer 0, head 0 of sequence ``seq``, sorted."""
  pos = np.asarray(cache.positions[0, seq, 0])
  return sorted(pos[pos >= 0].tolist())


def prefilled(lm, capacity, length, policy):
  return prefill(lm, empty(lm, capacity), [PROMPT[:length]], policy, 8)


def test_an_unchecked_step_past_capacity_drops_tokens_silently(lm):
  """What the checks guard against: the jitted step itself scatters a token
  without a slot nowhere, and the length advances all the same."""
  cache = empty(lm, 16)
  _, cache = steps.forward(lm.graphdef, lm.params, cache,
                           jnp.asarray([PROMPT[:20]]), jnp.asarray([20]),
                           policy=KeepAll())
  assert int(cache.lengths[0]) == 20
  assert live_positions(cache) == list(range(16))


def test_prefill_past_an_appending_cache_raises(lm):
  logits, cache = prefilled(lm, 16, 16, KeepAll())
  assert live_positions(cache) == list(range(16))
  with pytest.raises(ValueError, match=r"^prefill: sequence 1 holds 0 tokens "
                     r"and its prompt adds 17, 17 in all, past the cache's "
                     r"capacity of 16 slots \(policy 'full' evicts nothing\)"):
    prefill(lm, empty(lm, 16, batch=2), [PROMPT[:5], PROMPT[:17]], KeepAll(),
            8)
  # a prompt fed after others counts what the sequence already holds
  with pytest.raises(ValueError, match="holds 16 tokens and its prompt adds 1,"):
    prefill(lm, cache, [PROMPT[:1]], KeepAll(), 8)


def test_streaming_prefill_without_free_slots_raises(lm):
  """A prompt longer than the cache streams, evicting to the budget (8)
  after each pass of 4: a pass needs 4 free slots beside the 8 kept."""
  with pytest.raises(ValueError, match=r"^prefill: a pass feeds 4 tokens to "
                     r"sequence 0 \(length 8\), whose fullest \(layer, head\) "
                     r"row holds 8 of the cache's 11 slots"):
    prefill(lm, empty(lm, 11), [PROMPT[:20]], snapkv(), 4)
  _, cache = prefill(lm, empty(lm, 12), [PROMPT[:20]], snapkv(), 4)
  assert int(cache.lengths[0]) == 20 and 19 in live_positions(cache)


def test_a_pass_that_fills_rows_until_they_evict_is_not_refused(lm):
  """Under decoding() with evict_every=0 a row evicts only once full: 8 kept
  + 4 + 4 fill the 16 slots, the row evicts to 8, and 4 more fit. Nothing
  is dropped, so nothing is refused (a bound on the rows would be)."""
  _, cache = prefilled(lm, 16, 16, snapkv())   # compressed to 8
  assert len(live_positions(cache)) == 8
  _, cache = prefill(lm, cache, [PROMPT[16:24] + PROMPT[:4]],
                     snapkv().decoding(), 4)
  assert int(cache.lengths[0]) == 28
  assert live_positions(cache)[-4:] == [24, 25, 26, 27]


@pytest.mark.parametrize("on_token", [None, lambda *args: None])
def test_decode_past_an_appending_cache_raises(lm, on_token):
  """max_new_tokens N feeds N - 1 tokens (the last is sampled only)."""
  logits, cache = prefilled(lm, 16, 10, KeepAll())
  out = decode(lm, cache, logits, max_new_tokens=7, stop_tokens=(),
               on_token=on_token)
  assert int(out.cache.lengths[0]) == 16
  logits, cache = prefilled(lm, 16, 10, KeepAll())
  with pytest.raises(ValueError, match=r"^decode: sequence 0 holds 10 tokens "
                     r"and decoding adds up to 7, 17 in all, past the cache's "
                     r"capacity of 16 slots"):
    decode(lm, cache, logits, max_new_tokens=8, stop_tokens=(),
           on_token=on_token)


def test_a_sequence_that_stops_at_once_needs_no_room(lm):
  """A sequence whose first sampled token is a stop token feeds nothing."""
  logits, cache = prefilled(lm, 16, 16, KeepAll())
  first = int(np.argmax(logits[0]))
  out = decode(lm, cache, logits, max_new_tokens=8, stop_tokens=(first,))
  assert out.tokens == [[first]] and out.finished == [True]


def test_decode_in_a_cache_no_larger_than_the_budget_raises(lm):
  """snapkv keeps up to 8 tokens per row: in 8 slots eviction frees none, so
  6 prompt tokens leave room for 2 more; in 12, decoding runs on."""
  logits, cache = prefilled(lm, 8, 6, snapkv())
  out = decode(lm, cache, logits, max_new_tokens=3, policy=snapkv(),
               stop_tokens=())
  assert live_positions(out.cache) == list(range(8))
  logits, cache = prefilled(lm, 8, 6, snapkv())
  with pytest.raises(ValueError, match=r"^decode: sequence 0 \(length 6\) has "
                     r"a row holding 6 of the cache's 8 slots and decoding "
                     r"feeds up to 3 more tokens, but policy 'snapkv' keeps "
                     r"up to 8 per row"):
    decode(lm, cache, logits, max_new_tokens=4, policy=snapkv(), stop_tokens=())
  logits, cache = prefilled(lm, 12, 10, snapkv())
  out = decode(lm, cache, logits, max_new_tokens=30, policy=snapkv(),
               stop_tokens=())
  assert int(out.cache.lengths[0]) == 39 and 38 in live_positions(out.cache)


def test_decode_from_a_full_row_raises(lm):
  """A policy evicts after a step: a row full before the first one has no
  slot for it (here a prompt fed without compression fills the cache)."""
  logits, cache = prefilled(lm, 12, 12, KeepAll())
  with pytest.raises(ValueError, match=r"^decode: a row of sequence 0 "
                     r"\(length 12\) holds all 12 slots of the cache, and "
                     r"policy 'snapkv' evicts only after a step"):
    decode(lm, cache, logits, max_new_tokens=2, policy=snapkv(),
           stop_tokens=())
  # the step itself would have dropped the token: the length advances, the
  # newest position (12) is nowhere
  policy = snapkv().bind(lm.cfg).decoding()
  _, _, cache = steps.decode_step(
      lm.graphdef, lm.params, cache, jnp.asarray([5]), jnp.asarray([True]),
      jax.random.key(0), policy=policy, sampling=Sampling())
  assert int(cache.lengths[0]) == 13 and 12 not in live_positions(cache)
