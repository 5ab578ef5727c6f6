"""KIVI in the slot cache: keys per channel over groups of slots, values per
token, the not-yet-full group held exact (``QuantPlan.key_layout="channel"``)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
# the tiny model (fixture), text and loops of test_quant_prefill (same CFG)
from test_quant_prefill import TOKENS, chunked_nll, decode_nll, lm  # noqa: F401
from lmcache_jax import attention
from lmcache_jax.attention.slots import dense_attend
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.kernels import backend
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import FORMATS
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.quant.plan import QuantPlan

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
GROUP = 8           # slots per key group in these tests (KIVI's G)


def kivi_plan(fmt="int2", residual=GROUP, sinks=0, formats=None,
              copy_bits=16, group=GROUP):
  if formats is None:
    return QuantPlan.uniform(CFG, fmt, group_size=32, residual=residual,
                             sinks=sinks, copy_bits=copy_bits,
                             key_layout="channel", key_group=group)
  return QuantPlan(formats, np.ones((3, 3, 32), np.float32), 32, residual,
                   sinks, "", False, None, copy_bits, 0, "channel", group)


# -- the numpy reference ----------------------------------------------------

def ref_grid(x, bits):
  """KIVI's min/max grid of one group x [G, Hd] per channel, float16 as the
  cache stores it: (scale, low), the scale rounded up so the top is reached."""
  levels = 2 ** bits - 1
  lo, hi = x.min(0).astype(np.float32), x.max(0).astype(np.float32)
  low = lo.astype(np.float16)
  span = np.maximum(hi - low.astype(np.float32), 0) / levels
  scale = span.astype(np.float16)
  short = scale.astype(np.float32) < span
  scale[short] = np.nextafter(scale[short], np.float16(np.inf))
  return scale, low


def ref_codes(x, scale, low, bits):
  s = scale.astype(np.float32)
  u = (x - low.astype(np.float32)) / np.where(s > 0, s, 1)
  codes = np.clip(np.floor(np.where(s > 0, u, 0) + 0.5), 0, 2 ** bits - 1)
  return codes * s + low.astype(np.float32)


def ref_keys(keys, bits, residual, sinks, group=GROUP):
  """What a KIVI cache reads for keys [T, Hd] written at slots 0..T-1: the
  sinks and latest ``residual`` exact, every full group of ``group`` slots
  on its per-channel grid (set by its non-sink tokens), nothing else."""
  steps_ = len(keys)
  out = np.full_like(keys, np.nan)
  for start in range(0, steps_ - group + 1, group):
    x = keys[start:start + group]
    grid_rows = np.arange(start, start + group) >= sinks
    scale, low = ref_grid(x[grid_rows], bits)
    out[start:start + group] = ref_codes(x, scale, low, bits)
  exact = (np.arange(steps_) < sinks) | (np.arange(steps_) >= steps_ - residual)
  out[exact] = keys[exact]
  return out


# -- helpers ----------------------------------------------------------------

def layer_of(cache, l):
  return attention.layer_of(attention.LayerKV(
      cache.keys, cache.values, cache.positions, cache.scores), jnp.int32(l))


_write = jax.jit(attention.write_slots)
_dequantize = jax.jit(qpayload.dequantize, static_argnames=("dtype", "exact"))


def write_in_chunks(layer, k, v, positions, chunk):
  """Writes k, v [B, T, K, Hd] of ``positions`` [T] (slot = position), in
  chunks of ``chunk`` tokens."""
  batch = k.shape[0]
  for start in range(0, len(positions), chunk):
    pos = np.broadcast_to(positions[start:start + chunk], (batch, len(
        positions[start:start + chunk]))).astype(np.int32)
    slots = jnp.broadcast_to(jnp.asarray(pos)[:, None, :], (batch, 3, pos.shape[1]))
    layer = _write(layer, k[:, start:start + chunk], v[:, start:start + chunk],
                   jnp.asarray(pos), slots)
  return layer


def random_kv(rng, batch, steps_):
  # a per-channel bias, as real keys carry (KIVI's outlier channels)
  bias = rng.standard_normal(32) * 4
  k = rng.standard_normal((batch, steps_, 3, 32)) + bias
  v = rng.standard_normal((batch, steps_, 3, 32))
  return jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32)


# -- round trip -------------------------------------------------------------

@pytest.mark.parametrize("fmt,residual,sinks,chunk", [
    ("int2", 8, 0, 1), ("int2", 8, 0, 13), ("int3", 12, 2, 5),
    ("int4", 16, 3, 32), ("int4", 8, 0, 32)])
def test_key_groups_round_trip_as_the_numpy_reference(fmt, residual, sinks,
                                                      chunk):
  """Whatever the chunking, full groups hold KIVI's per-channel codes, the
  window and sinks read exact, and values are per token."""
  rng = np.random.default_rng(0)
  plan = kivi_plan(fmt, residual, sinks)
  cache = init_cache(CFG, 2, 32, jnp.float32, quant=plan)
  layer = layer_of(cache, 1)
  steps_ = 29                       # 3 full groups and a partial one
  k, v = random_kv(rng, 2, steps_)
  layer = write_in_chunks(layer, k, v, np.arange(steps_), chunk)
  keys = np.asarray(_dequantize(layer.keys, jnp.float32))
  values = np.asarray(_dequantize(layer.values, jnp.float32))
  bits = FORMATS[fmt].bits
  for b in range(2):
    for h in range(3):
      want = ref_keys(np.asarray(k[b, :, h]), bits, residual, sinks)
      np.testing.assert_allclose(keys[b, h, :steps_], want, rtol=0,
                                 atol=1e-5, err_msg=f"b{b} h{h}")
      exact = ((np.arange(steps_) < sinks)
               | (np.arange(steps_) >= steps_ - residual))
      want_v = np.where(exact[:, None], np.asarray(v[b, :, h]),
                        np.asarray(schemes.fake_quant(v[b, :, h],
                                                      FORMATS[fmt], 32)))
      np.testing.assert_allclose(values[b, h, :steps_], want_v, rtol=0,
                                 atol=1e-5)
  sealed = np.asarray(layer.keys.parts[0].sealed)
  assert sealed.shape == (2, 3, 4)
  assert sealed[..., :3].all() and not sealed[..., 3].any()
  part = layer.keys.parts[0]
  assert part.scale.shape == (2, 3, 4, 32) and part.scale.dtype == jnp.float16
  assert part.zero.dtype == jnp.float16


def test_codes_equal_the_channel_quantizer_of_numerics():
  """The cache's codes of a sealed group are ``schemes.channel_quantize`` of
  its tokens (the numerics reference and the cache agree bit for bit)."""
  rng = np.random.default_rng(5)
  cache = init_cache(CFG, 1, 16, jnp.float32, quant=kivi_plan("int3"))
  layer = write_in_chunks(layer_of(cache, 0), *random_kv(rng, 1, 16),
                          np.arange(16), 4)
  k = write_in_chunks(layer_of(cache, 0), *random_kv(
      np.random.default_rng(5), 1, 16), np.arange(16), 16)
  part = layer.keys.parts[0]
  for got in (part, k.keys.parts[0]):
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(part.data))
  keys, _ = random_kv(np.random.default_rng(5), 1, 16)
  x = jnp.swapaxes(keys, 1, 2)[:, :, :8]                   # group 0
  words, scale, low = schemes.channel_quantize(
      x, jnp.ones(x.shape[:-1], bool), FORMATS["int3"])
  np.testing.assert_array_equal(np.asarray(part.data[:, :, :8]),
                                np.asarray(words))
  np.testing.assert_array_equal(np.asarray(part.scale[:, :, 0]),
                                np.asarray(scale))
  np.testing.assert_array_equal(np.asarray(part.zero[:, :, 0]),
                                np.asarray(low))


# -- attention over the cache ----------------------------------------------

MIXED = (("int4", "int2", "int4"), ("int2", "int4", "int3"),
         ("int3", "int4", "int2"))


@pytest.mark.parametrize("formats,sinks", [(None, 0), (MIXED, 2)])
def test_decode_attention_equals_attention_over_the_reference(formats, sinks,
                                                              caplog):
  """A decode step over a KIVI layer (dequantized, copies overlaid, dense)
  equals dense attention over the numpy reference's keys and values, mass
  included, and names its fallback once."""
  rng = np.random.default_rng(2)
  plan = kivi_plan("int2", 8, sinks, formats=formats)
  cache = init_cache(CFG, 2, 32, jnp.float32, quant=plan)
  steps_ = 21
  k, v = random_kv(rng, 2, steps_)
  layer = write_in_chunks(layer_of(cache, 1), k, v, np.arange(steps_), 6)
  layer = layer._replace(positions=layer.positions.at[0, :, 3].set(-1))
  fmts = (formats or (("int2",) * 3,) * 3)[1]
  keys = np.zeros((2, 3, 32, 32), np.float32)
  values = np.zeros((2, 3, 32, 32), np.float32)
  exact = (np.arange(steps_) < sinks) | (np.arange(steps_) >= steps_ - 8)
  for b in range(2):
    for h in range(3):
      fmt = FORMATS[fmts[h]]
      keys[b, h, :steps_] = ref_keys(np.asarray(k[b, :, h]), fmt.bits, 8,
                                     sinks)
      values[b, h, :steps_] = np.where(
          exact[:, None], v[b, :, h], schemes.fake_quant(v[b, :, h], fmt, 32))
  q = jnp.asarray(rng.standard_normal((2, 1, 6, 32)), jnp.float32)
  qpos = jnp.array([[20], [14]], jnp.int32)
  weights = jnp.array([[1.0], [0.5]])
  want = dense_attend(q, jnp.asarray(keys), jnp.asarray(values),
                      layer.positions, qpos, weights)
  backend.note.cache_clear()
  with caplog.at_level(logging.WARNING, logger="lmcache_jax.kernels"):
    got = jax.jit(attention.attend_slots)(q, layer, qpos, weights)
  assert "keys quantized per channel (KIVI) decode from the dequantized" in (
      caplog.text)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                             rtol=1e-5, atol=1e-6)


# -- a chunked prefill computes what a decode loop computes -----------------

@pytest.mark.parametrize("formats,residual,sinks,copy_bits,chunks", [
    (None, 8, 0, 16, (3, 8, 22)), (MIXED, 12, 2, 16, (5,)),
    (None, 8, 1, 8, (8,))])
def test_chunked_prefill_equals_decode_loop(lm, formats, residual, sinks,
                                            copy_bits, chunks):
  plan = kivi_plan("int2", residual, sinks, formats=formats,
                   copy_bits=copy_bits)
  want, decoded = decode_nll(lm, plan)
  for chunk in chunks:
    got, cache = chunked_nll(lm, plan, chunk)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5,
                               err_msg=f"chunk {chunk}")
    # the same groups sealed, on the same grids
    for a, b in zip(cache.keys.parts, decoded.keys.parts):
      np.testing.assert_array_equal(np.asarray(a.sealed), np.asarray(b.sealed))
      np.testing.assert_allclose(np.asarray(a.scale, np.float32),
                                 np.asarray(b.scale, np.float32),
                                 rtol=2e-3, atol=1e-6)
  # 22 tokens: groups 0 and 1 full and sealed, group 2 held by the copies
  sealed = np.asarray(decoded.keys.parts[0].sealed)[0]          # [P, S/G]
  assert sealed[:, :2].all() and not sealed[:, 2:].any()


# -- eviction: holes in sealed groups ---------------------------------------

def write_tokens(layer, k, v, positions, slots):
  """k, v [1, T, K, Hd] at positions [T] into slots [K, T] (per head)."""
  pos = jnp.asarray(np.asarray(positions, np.int32)[None])
  return _write(layer, k, v, pos, jnp.asarray(np.asarray(slots)[None]))


def test_eviction_leaves_masked_holes_refilled_on_the_group_grid():
  """An evicted slot of a sealed group is a masked hole; a later token
  written there is coded on the group's grid, clamped, and nothing else of
  the group changes."""
  rng = np.random.default_rng(7)
  cache = init_cache(CFG, 1, 16, jnp.float32, quant=kivi_plan("int2"))
  k, v = random_kv(rng, 1, 16)
  layer = write_in_chunks(layer_of(cache, 0), k, v, np.arange(16), 16)
  part = layer.keys.parts[0]
  assert np.asarray(part.sealed).all()
  # evict slots 2 and 5 of group 0 (no copies: they left the window)
  holes = layer._replace(positions=layer.positions.at[:, :, jnp.array([2, 5])]
                         .set(-1))
  q = jnp.asarray(rng.standard_normal((1, 1, 6, 32)), jnp.float32)
  out, mass = jax.jit(attention.attend_slots)(q, holes, jnp.array([[15]]),
                                               jnp.ones((1, 1)))
  assert np.all(np.asarray(mass)[0, :, [2, 5]] == 0)
  keys = _dequantize(holes.keys, jnp.float32)
  want = dense_attend(q, keys, _dequantize(holes.values, jnp.float32),
                      holes.positions, jnp.array([[15]]), jnp.ones((1, 1)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=1e-5)
  # two new tokens far outside group 0's range, into the holes
  new_k = k[:, :2] * 3.0
  new_v = v[:, :2]
  filled = write_tokens(holes, new_k, new_v, [16, 17], [[5, 2]] * 3)
  after = filled.keys.parts[0]
  for name in ("scale", "zero", "sealed"):
    np.testing.assert_array_equal(np.asarray(getattr(after, name)),
                                  np.asarray(getattr(part, name)))
  untouched = np.setdiff1d(np.arange(16), [2, 5])
  np.testing.assert_array_equal(np.asarray(after.data[:, :, untouched]),
                                np.asarray(part.data[:, :, untouched]))
  packed = np.asarray(_dequantize(filled.keys, jnp.float32, exact=False))
  for h in range(3):
    scale = np.asarray(part.scale[0, h, 0])
    low = np.asarray(part.zero[0, h, 0])
    for slot, t in ((5, 0), (2, 1)):
      want = ref_codes(np.asarray(new_k[0, t, h]), scale, low, 2)
      np.testing.assert_allclose(packed[0, h, slot], want, atol=1e-6)
  # still the newest: read from their exact copies
  exact = np.asarray(_dequantize(filled.keys, jnp.float32))
  np.testing.assert_allclose(exact[0, :, 5], np.asarray(new_k[0, 0]),
                             atol=1e-6)


def test_no_occupied_slot_is_ever_read_from_an_unset_grid():
  """Random writes into the first free slots with random evictions: after
  every step each occupied slot is either read from its exact copy or lies
  in a sealed group whose grid codes its own token."""
  rng = np.random.default_rng(11)
  capacity, group = 16, 4
  plan = kivi_plan("int3", residual=4, sinks=1, group=group)
  cache = init_cache(CFG, 1, capacity, jnp.float32, quant=plan)
  layer = layer_of(cache, 2)
  token_key = {}                      # (head, slot) -> key vector written
  position = 0
  for step in range(30):
    live = np.array(layer.positions[0])                        # [K, S]
    if step > 3:      # evict a random older token per head (not the newest)
      for h in range(3):
        older = np.flatnonzero((live[h] >= 0) & (live[h] < position - 1))
        if len(older) and rng.random() < 0.7:
          live[h, rng.choice(older)] = -1
      layer = layer._replace(positions=jnp.asarray(live[None], jnp.int32))
    n = int(rng.integers(1, 4))
    free = [np.flatnonzero(live[h] < 0)[:n] for h in range(3)]
    n = min(n, *(len(f) for f in free))
    if n == 0:
      continue
    k, v = random_kv(rng, 1, n)
    slots = np.stack([f[:n] for f in free])
    layer = write_tokens(layer, k, v, np.arange(position, position + n),
                         slots)
    for h in range(3):
      for t in range(n):
        token_key[h, int(slots[h, t])] = np.asarray(k[0, t, h])
    position += n
    part = layer.keys.parts[0]
    mirrored = np.asarray(qpayload.mirrored(layer.keys, capacity))[0]
    sealed = np.asarray(part.sealed)[0]
    packed = np.asarray(_dequantize(layer.keys, jnp.float32, exact=False))[0]
    pos = np.asarray(layer.positions)[0]
    for h in range(3):
      for slot in np.flatnonzero(pos[h] >= 0):
        if mirrored[h, slot]:
          continue
        g = slot // group
        assert sealed[h, g], f"step {step}: slot {slot} of head {h} unreadable"
        want = ref_codes(token_key[h, slot], np.asarray(part.scale[0, h, g]),
                         np.asarray(part.zero[0, h, g]), 3)
        np.testing.assert_allclose(packed[h, slot], want, atol=1e-5)


# -- the store moves packed KIVI chunks -------------------------------------

def test_store_round_trip_of_kivi_chunks(lm, tmp_path):
  """Whole chunks of a KIVI cache go through the disk tier's bytes and come
  back bit for bit (codes, per-channel grids, sealed flags); the loaded
  prefix's sinks and window get copies holding their codes."""
  from lmcache_jax.engine.prefill import prefill
  from lmcache_jax.store import DiskTier, HostTier, KVStore, Layout
  from policies.replacement.lru import LRU
  plan = kivi_plan("int4", residual=8, sinks=2)
  new_cache = lambda: init_cache(CFG, 1, 32, jnp.float32, quant=plan)  # noqa: E731
  prompt = [int(t) for t in TOKENS[:21]]
  logits, cache = prefill(lm, new_cache(), [prompt], KeepAll(), 8)
  layout = Layout.of(new_cache())
  assert [s.group for s in layout.leaves] == [1, 8, 8, 8, 1, 1, 1]
  with pytest.raises(ValueError, match="chunk_size 4 does not divide.*"
                                       "multiple of 8"):
    KVStore(layout, [HostTier(1 << 20, LRU())], model_fingerprint=b"kivi",
            chunk_size=4)
  store = KVStore(layout, [HostTier(1 << 20, LRU()),
                           DiskTier(str(tmp_path), 1 << 20, LRU())],
                  model_fingerprint=b"kivi", chunk_size=8)
  assert store.store(prompt, cache, wait=True) == 2       # 16 of 21 tokens
  reader = KVStore(layout, [DiskTier(str(tmp_path), 1 << 20, LRU())],
                   model_fingerprint=b"kivi", chunk_size=8)
  loaded, prefix = reader.load_into(new_cache(), 0, prompt, 16)
  assert prefix.sources == ["disk", "disk"]
  for name in ("keys", "values"):
    for a, b in zip(getattr(loaded, name).parts, getattr(cache, name).parts):
      for leaf in a.slot_leaves:
        got, want = np.asarray(getattr(a, leaf)), np.asarray(getattr(b, leaf))
        n = 16 * got.shape[2] // 32
        np.testing.assert_array_equal(got[:, :, :n], want[:, :, :n],
                                      err_msg=f"{name}.{leaf}")
        assert not got[:, :, n:].any()
  assert np.asarray(loaded.keys.parts[0].sealed)[0, :, :2].all()
  np.testing.assert_array_equal(np.asarray(loaded.positions[:, 0, :, :16]),
                                np.broadcast_to(np.arange(16), (3, 3, 16)))
  for name in ("keys", "values"):
    kv = getattr(loaded, name)
    slots = np.asarray(kv.exact_slots)[:, 0]                    # [L, K, E]
    assert sorted(slots[0, 0]) == [0, 1, 8, 9, 10, 11, 12, 13, 14, 15]
    for l in range(3):
      one = qpayload.layer_view(kv, l)
      exact = np.asarray(_dequantize(one, jnp.float32))[0, :, :16]
      codes = np.asarray(_dequantize(
          qpayload.layer_view(getattr(cache, name), l), jnp.float32,
          exact=False))[0, :, :16]
      np.testing.assert_allclose(exact, codes, rtol=0, atol=1e-6)
  # The rest of the prompt after the loaded prefix computes what it computes
  # after a prefill of the prefix whose sink and window copies are replaced
  # by their codes: loading changes nothing else.
  from lmcache_jax.store.layout import mark_prefix
  _, cold = prefill(lm, new_cache(), [prompt[:16]], KeepAll(), 8)
  for name in ("keys", "values"):
    for a, b in zip(getattr(loaded, name).parts, getattr(cold, name).parts):
      for leaf in a.slot_leaves:
        np.testing.assert_array_equal(np.asarray(getattr(a, leaf)),
                                      np.asarray(getattr(b, leaf)))
  warm_logits, _ = prefill(lm, loaded, [prompt[16:]], KeepAll(), 8)
  want, _ = prefill(lm, mark_prefix(cold, 0, 16), [prompt[16:]], KeepAll(), 8)
  np.testing.assert_allclose(np.asarray(warm_logits), np.asarray(want),
                             rtol=0, atol=1e-5)
  assert np.abs(np.asarray(warm_logits) - np.asarray(logits)).max() > 1e-3


# -- knobs ------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    (dict(key_layout="row"), "key_layout must be one of 'token', 'channel', "
                             "got 'row'"),
    (dict(key_group=0), "key_group must be a positive int.*got 0"),
    (dict(key_group=2.5), "key_group must be a positive int.*got 2.5"),
    (dict(residual=4), "residual must be >= key_group=8; got residual=4"),
    (dict(formats=(("fp8",) * 3,) * 3), "needs int formats.*got fp8"),
    (dict(outliers=1), "keeps no outlier entries.*got outliers=1"),
])
def test_bad_knobs_are_one_line_errors(changes, message):
  with pytest.raises(ValueError, match=message) as error:
    kivi_plan().replace(**changes)
  assert "\n" not in str(error.value)


def test_capacity_must_hold_whole_key_groups():
  with pytest.raises(ValueError, match="cache capacity 20 is not a multiple "
                                       "of the plan's key_group 8.*use e.g. 24"
                     ) as error:
    init_cache(CFG, 1, 20, jnp.float32, quant=kivi_plan())
  assert "\n" not in str(error.value)
  # a per-token plan takes any capacity, whatever its key_group
  init_cache(CFG, 1, 20, jnp.float32, quant=kivi_plan().replace(
      key_layout="token"))


def test_plan_saves_its_key_layout(tmp_path):
  plan = kivi_plan("int3", residual=16, sinks=1, group=16)
  loaded = QuantPlan.load(plan.save(tmp_path / "plan"), CFG)
  assert (loaded.key_layout, loaded.key_group) == ("channel", 16)
  assert "keys per channel over 16-token groups" in loaded.describe()


# -- the calibration policy -------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kivi_policy_gives_the_published_plan(lm, bits):
  """``--calibration=kivi --kv_bits=B``: keys per channel over 32 tokens,
  values per token over 32 channels, 128 exact tokens in the cache dtype,
  whatever the run's own exact-token knobs (config defaults here)."""
  from experiments import setup
  config = dict(kv_bits=bits, calibration="kivi", group_size=64,
                residual=32, sinks=4, copy_bits=8, rotate=True,
                center_keys=True)
  plan = setup.quant_plan(config, lm, calibration_tokens=list(TOKENS))
  assert plan.formats == ((f"int{bits}",) * 3,) * 3
  assert (plan.key_layout, plan.key_group, plan.group_size) == (
      "channel", 32, 32)
  assert (plan.residual, plan.sinks, plan.copy_bits) == (128, 0, 16)
  assert not plan.rotate and plan.key_shift is None
  assert plan.policy == "kivi"
  init_cache(CFG, 1, 256, jnp.float32, quant=plan)


def test_kivi_policy_refuses_fractional_bits(lm):
  from policies.registry import CALIBRATION
  policy = CALIBRATION.make("kivi(residual=32)")
  with pytest.raises(ValueError, match="kv_bits must be 2, 3, 4 or 8, got "
                                       "2.5"):
    policy.calibrate(lm, None, bits=2.5, group_size=64, residual=0, sinks=0)
  assert policy.calibrate(lm, None, bits=4, group_size=64, residual=0,
                          sinks=0).residual == 32
