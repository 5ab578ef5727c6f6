"""The store's parts: keys, replacement rules, tiers, chunk codec, layouts, round trips."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.store import codec
from lmcache_jax.store.crypto import Cipher
from lmcache_jax.store.keys import chunk_keys, model_fingerprint, namespace
from lmcache_jax.store.layout import (Layout, insert_prefix, slice_chunk,
                                      slot_arrays, with_slot_arrays)
from lmcache_jax.store.tier import MemoryTier
from lmcache_jax.store.tiers import DiskTier, HostTier
from policies.registry import REPLACEMENT
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from conftest import tiny_config, tiny_weights
from store_helpers import (CHUNK, assert_prefix_is, filled_cache, make_store,
                           quantized_like_cache, tokens_for)


def test_key_chain_depends_on_the_whole_prefix():
  root = namespace(b"model", b"layout")
  a = tokens_for(0, 40)
  b = list(a)
  b[12] += 1  # inside chunk 1
  ka, kb = chunk_keys(a, CHUNK, root), chunk_keys(b, CHUNK, root)
  assert len(ka) == 5  # the trailing partial chunk has no key
  assert ka[0] == kb[0] and all(x != y for x, y in zip(ka[1:], kb[1:]))
  assert chunk_keys(a, CHUNK, namespace(b"other model", b"layout"))[0] != ka[0]
  assert chunk_keys(a[:17], CHUNK, root) == ka[:2]


def tiny_lm(weights, dtype=jnp.float32):
  return LoadedModel.from_module(from_weights(tiny_config(), weights, dtype))


def test_fingerprint_covers_the_last_element_of_every_weight():
  """A one-ulp change to the last element of the last layer of any weight
  changes the fingerprint; equal weights loaded twice keep it."""
  weights = tiny_weights(tiny_config())
  base = model_fingerprint(tiny_lm(weights))
  assert model_fingerprint(tiny_lm(dict(weights))) == base
  unchanged = []
  for name, array in weights.items():
    changed = array.copy()
    last = changed.reshape(-1)
    last[-1] = np.nextafter(last[-1], np.float32(np.inf))
    if model_fingerprint(tiny_lm({**weights, name: changed})) == base:
      unchanged.append(name)
  assert unchanged == []
  assert model_fingerprint(tiny_lm(weights, jnp.bfloat16)) != base


# (rule, operations, expected victim); "i k" inserts, "t k" touches.
RULE_CASES = [
    ("lru", "i a, i b, i c, t a", "b"),
    ("fifo", "i a, i b, i c, t a", "a"),
    ("lfu", "i a, i b, i c, t a, t c, t c, t b", "a"),
    ("lfu", "i a, i b, t a, t b", "a"),
]


@pytest.mark.parametrize("name, ops, victim", RULE_CASES)
def test_replacement_rule_victims(name, ops, victim):
  rule = REPLACEMENT.make(name)
  for op in ops.split(", "):
    verb, key = op.split()
    (rule.insert if verb == "i" else rule.touch)(key)
  assert rule.victim() == victim
  rule.remove(victim)
  assert rule.victim() != victim


def test_replacement_rules_are_registered():
  assert {"lru", "lfu", "fifo"} <= set(REPLACEMENT.names())


def test_memory_tier_evicts_within_capacity():
  tier = HostTier(30, REPLACEMENT.make("lru"))
  for key in "abc":
    assert tier.put(key, key.upper(), 10)
  tier.get("a")
  assert tier.put("d", "D", 10)
  assert "b" not in tier and tier.get("a") == "A" and tier.used == 30
  assert not tier.put("huge", "X", 31)
  assert tier.evictions == 1


def leaves_of(seed):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((3, 2, 8, 8)).astype(np.float32),
          rng.integers(0, 255, (3, 2, 2, 4), dtype=np.uint8),
          np.asarray(rng.standard_normal((3, 2, 8, 8)), jnp.bfloat16)]


EXPECTED = [((3, 2, 8, 8), "float32"), ((3, 2, 2, 4), "uint8"),
            ((3, 2, 8, 8), "bfloat16")]


@pytest.mark.parametrize("encrypted", [False, True])
def test_codec_round_trip(encrypted):
  cipher = Cipher(bytes(range(32))) if encrypted else None
  key = bytes(32)
  leaves = leaves_of(0)
  blob = codec.encode(key, leaves, cipher)
  for got, want in zip(codec.decode(blob, key, EXPECTED, cipher), leaves):
    np.testing.assert_array_equal(got, want)
  if encrypted:
    assert leaves[0].tobytes()[:64] not in blob


@settings(max_examples=25, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7),
       encrypted=st.booleans())
def test_codec_detects_any_flipped_bit(position, bit, encrypted):
  cipher = Cipher(bytes(range(32))) if encrypted else None
  key = bytes(32)
  blob = bytearray(codec.encode(key, leaves_of(1), cipher))
  blob[position % len(blob)] ^= 1 << bit
  with pytest.raises(codec.CorruptChunk):
    codec.decode(bytes(blob), key, EXPECTED, cipher)


def test_codec_rejects_truncation_other_key_other_layout_other_cipher():
  key = bytes(32)
  blob = codec.encode(key, leaves_of(2))
  for bad_blob, bad_key, expected, cipher in [
      (blob[:-1], key, EXPECTED, None),
      (blob[:10], key, EXPECTED, None),
      (blob, b"\1" * 32, EXPECTED, None),
      (blob, key, [((3, 2, 8, 8), "bfloat16")] + EXPECTED[1:], None),
      (blob, key, EXPECTED, Cipher(bytes(32))),
  ]:
    with pytest.raises(codec.CorruptChunk):
      codec.decode(bad_blob, bad_key, expected, cipher)
  sealed = codec.encode(key, leaves_of(2), Cipher(bytes(32)))
  with pytest.raises(codec.CorruptChunk):
    codec.decode(sealed, key, EXPECTED, Cipher(b"\7" * 32))


def test_round_trip_through_every_tier(tmp_path):
  cache = filled_cache(0, batch=2, length=40)
  tokens = tokens_for(0, 40)
  for tiers in [dict(device_bytes=1 << 20), dict(host_bytes=1 << 20),
                dict(disk_dir=str(tmp_path / "d"), disk_bytes=1 << 20)]:
    store = make_store(**tiers)
    assert store.store(tokens, cache, row=1, wait=True) == 5
    assert store.store(tokens, cache, row=1, wait=True) == 0
    assert store.lookup(tokens) == 40
    assert store.lookup(tokens[:30] + [5] * 10) == 24
    prefix = store.load(tokens, 36)
    assert prefix.num_tokens == 32
    assert prefix.sources == [next(iter(tiers)).split("_")[0]] * 4
    assert_prefix_is(prefix, cache, row=1)
    target = init_cache(tiny_config(), 2, 64, jnp.float32)
    target = store.insert(target, 0, prefix)
    np.testing.assert_array_equal(target.keys[:, 0, :, :32], cache.keys[:, 1, :, :32])
    np.testing.assert_array_equal(target.positions[:, 0, :, :33].max(-1), 31)
    assert list(np.asarray(target.lengths)) == [32, 0]
    store.close()


def test_disk_hit_is_promoted_to_faster_tiers(tmp_path):
  cache = filled_cache(1)
  tokens = tokens_for(1, 64)
  make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20).store(
      tokens, cache, wait=True)
  store = make_store(device_bytes=1 << 20, host_bytes=1 << 20,
                     disk_dir=str(tmp_path), disk_bytes=1 << 20)
  assert store.load(tokens).sources == ["disk"] * 8
  store.flush()
  assert store.load(tokens).sources == ["device"] * 8
  store.tier("device").drop(store.keys(tokens)[0])
  assert store.load(tokens).sources == ["host"] + ["device"] * 7
  assert_prefix_is(store.load(tokens), cache)


class Remote(MemoryTier):
  """A storage tier in one class: a dict standing for a remote service."""
  name = "remote"


def test_a_new_storage_tier_is_checked_and_backs_up_the_others(tmp_path):
  cache = filled_cache(4)
  tokens = tokens_for(4, 64)
  remote = Remote(1 << 20, REPLACEMENT.make("lru"))
  store = make_store(tiers=[DiskTier(str(tmp_path), 1 << 20,
                                     REPLACEMENT.make("lru")), remote])
  store.store(tokens, cache, wait=True)
  keys = store.keys(tokens)
  assert len(remote) == 8 and all(isinstance(remote._values[k], bytes)
                                  for k in keys)
  disk_file = tmp_path / (keys[0].hex() + ".kv")
  disk_file.write_bytes(disk_file.read_bytes()[:-1])
  prefix = store.load(tokens)  # the damaged disk copy is dropped
  assert prefix.sources == ["remote"] + ["disk"] * 7
  assert_prefix_is(prefix, cache)
  store.flush()
  assert keys[0] in store.tier("disk")  # promoted from the remote tier
  blob = bytearray(remote._values[keys[1]])
  blob[-1] ^= 1
  remote._values[keys[1]] = bytes(blob)
  store.tier("disk").drop(keys[1])
  prefix = store.load(tokens)  # no intact copy of chunk 1 is left
  assert prefix.sources == ["disk"] and keys[1] not in remote
  assert_prefix_is(prefix, cache)


def test_prefetch_warms_the_host_tier(tmp_path):
  cache = filled_cache(2)
  tokens = tokens_for(2, 64)
  make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20).store(
      tokens, cache, wait=True)
  store = make_store(host_bytes=1 << 20, disk_dir=str(tmp_path),
                     disk_bytes=1 << 20)
  assert store.prefetch(tokens[:40]).result() == 5
  assert store.load(tokens).sources == ["host"] * 5 + ["disk"] * 3


def test_grouped_payload_layout():
  cache = quantized_like_cache()
  layout = Layout.of(cache)
  assert [s.group for s in layout.leaves] == [1, 4, 4, 1, 4, 4]
  with pytest.raises(ValueError, match="chunk_size 6 does not divide"):
    layout.check_chunk_size(6)
  chunk = slice_chunk(cache, layout, 0, 8, 8)
  np.testing.assert_array_equal(chunk[1], cache.keys.parts[0].scale[0, :, 2:4])
  zeroed = lambda kv: with_slot_arrays(  # noqa: E731
      kv, [jnp.zeros_like(a) for a in slot_arrays(kv)])
  empty = cache.replace(keys=zeroed(cache.keys), values=zeroed(cache.values),
                        positions=jnp.full_like(cache.positions, -1))
  filled = insert_prefix(empty, layout, 0, [slice_chunk(cache, layout, 0, 0, 8),
                                            chunk], 8)
  got = [a for kv in (filled.keys, filled.values)
         for a in (kv.parts[0].data, kv.parts[0].scale, kv.parts[0].zero)]
  want = [a for kv in (cache.keys, cache.values)
          for a in (kv.parts[0].data, kv.parts[0].scale, kv.parts[0].zero)]
  for g, w, spec in zip(got, want, layout.leaves):
    n = 16 // spec.group  # entries of the 16 inserted tokens
    np.testing.assert_array_equal(g[:, :, :n], w[:, :, :n])
    assert not np.asarray(g[:, :, n:]).any()
  assert int(filled.lengths[0]) == 16


def test_a_store_is_a_context_manager_that_flushes_and_releases(tmp_path):
  cache, tokens = filled_cache(3), tokens_for(3, 64)
  with make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20) as store:
    assert store.store(tokens, cache) == 8          # queued in the background
    disk = store.tier("disk")
    owner = tmp_path / f".lmcache-{disk.owner}.owner"
    assert owner.exists()
  assert len(list(tmp_path.glob("*.kv"))) == 8 and not owner.exists()
  with pytest.raises(ValueError, match="the store is closed; make a new one"):
    store.load(tokens)
  with pytest.raises(ValueError, match="disk tier at .* is closed; make a new"):
    make_store(tiers=[disk])
  store.close()                                     # twice: nothing happens
  with make_store(disk_dir=str(tmp_path), disk_bytes=1 << 20) as reopened:
    assert_prefix_is(reopened.load(tokens), cache)
