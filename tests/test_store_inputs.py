"""Bad input to the store gets a clear error naming the value and what is valid."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import pytest

from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.models.llama import from_weights
from experiments.setup import make_store as store_from_config
from lmcache_jax.store import DiskTier, HostTier, KVStore, Layout
from lmcache_jax.store.crypto import load_cipher
from policies.replacement.lru import LRU
from conftest import tiny_config, tiny_weights
from store_helpers import filled_cache, make_store, quantized_like_cache


def test_unwritable_directory(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="not writable"):
    make_store(disk_dir=str(blocker / "store"), disk_bytes=1 << 20)


@pytest.mark.parametrize("tier", ["device_bytes", "host_bytes", "disk_bytes"])
def test_zero_capacity(tmp_path, tier):
  tiers = dict(disk_dir=str(tmp_path)) if tier == "disk_bytes" else {}
  with pytest.raises(ValueError, match="capacity must be a positive"):
    make_store(**tiers, **{tier: 0})


def test_no_tier_and_half_a_disk_tier(tmp_path):
  with pytest.raises(ValueError, match="at least one tier"):
    make_store()
  with pytest.raises(ValueError, match="capacity must be a positive.*None"):
    make_store(disk_dir=str(tmp_path))
  with pytest.raises(ValueError, match="disk tier needs a directory.*None"):
    make_store(disk_bytes=1 << 20)


def test_tiers_must_be_tiers_with_own_names_and_rules(tmp_path):
  with pytest.raises(ValueError, match="must be Tier objects.*got 'host'"):
    make_store(tiers=["host"])
  with pytest.raises(ValueError, match="name 'host' twice"):
    make_store(tiers=[HostTier(1 << 20, LRU()), HostTier(1 << 20, LRU())])
  shared = LRU()
  with pytest.raises(ValueError, match="host and disk tiers share one "
                                       "replacement rule"):
    make_store(tiers=[HostTier(1 << 20, shared),
                      DiskTier(str(tmp_path), 1 << 20, shared)])
  with pytest.raises(ValueError, match="host tier's replacement must be a "
                                       "rule object.*got 'lfu'"):
    HostTier(1 << 20, "lfu")
  with pytest.raises(ValueError, match="no tier 'disk'; its tiers: host"):
    make_store(host_bytes=1 << 20).tier("disk")


def test_chunk_size_must_divide_layout():
  with pytest.raises(ValueError, match="chunk_size must be a positive"):
    make_store(chunk_size=0, host_bytes=1 << 20)
  layout = Layout.of(quantized_like_cache(group=4))
  with pytest.raises(ValueError, match="chunk_size 6 does not divide.*multiple of 4"):
    KVStore(layout, [HostTier(1 << 20, LRU())], model_fingerprint=b"m",
            chunk_size=6)


def test_cache_of_another_layout_is_refused():
  store = make_store(host_bytes=1 << 20)
  cache = init_cache(tiny_config(), 1, 16, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"the cache \(dense bfloat16\) has "
                     r"another payload layout than the store's \(dense float32"):
    store.store(list(range(16)), cache)
  with pytest.raises(ValueError, match="row 3 is outside"):
    store.store(list(range(16)), filled_cache(0), row=3)


def test_quantized_cache_in_a_dense_store_says_to_pass_the_plan():
  """A store made without a plan, then a quantized cache (the API's
  ``make_store(tiers)`` and ``generate(kv_bits=4)``): the error says how to
  make the store for it."""
  store = make_store(host_bytes=1 << 20)
  quantized = quantized_like_cache()
  advice = (r"\(quantized \(plan [0-9a-f]{8}\)\) has another payload layout "
            r"than the store's \(dense float32\).*make_store\(\.\.\., "
            r"quant=plan\) \(e\.g\. quant=model\.plan\(kv_bits\)\)")
  with pytest.raises(ValueError, match=advice):
    store.store(list(range(32)), quantized)
  with pytest.raises(ValueError, match=advice):
    store.load_into(quantized, 0, list(range(32)))
  store.close()


@pytest.mark.parametrize("content", [b"short", b"z" * 64, b"\0" * 33])
def test_wrong_key_file(tmp_path, content):
  path = tmp_path / "key"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="is not valid.*32 raw bytes"):
    load_cipher(key_file=str(path))


def test_missing_key_file_and_variable(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="cannot read the encryption key file"):
    load_cipher(key_file=str(tmp_path / "absent"))
  monkeypatch.delenv("LMCACHE_TEST_KEY", raising=False)
  with pytest.raises(ValueError, match="LMCACHE_TEST_KEY.*not set"):
    load_cipher(key_env="LMCACHE_TEST_KEY")
  monkeypatch.setenv("LMCACHE_TEST_KEY", "ab" * 32)
  assert load_cipher(key_env="LMCACHE_TEST_KEY") is not None


def test_store_reopened_with_another_key(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  one.write_bytes(os.urandom(32))
  two.write_text("cd" * 32)
  directory = str(tmp_path / "store")
  make_store(disk_dir=directory, disk_bytes=1 << 20,
             cipher=load_cipher(key_file=str(one)))
  with pytest.raises(ValueError, match="key does not match"):
    make_store(disk_dir=directory, disk_bytes=1 << 20,
               cipher=load_cipher(key_file=str(two)))
  with pytest.raises(ValueError, match="is encrypted; open it with"):
    make_store(disk_dir=directory, disk_bytes=1 << 20)


def test_a_wrong_key_deletes_no_file(tmp_path):
  """Reopened with another key and a smaller capacity, the disk tier refuses
  the directory before it evicts anything to fit the capacity."""
  key = tmp_path / "key"
  key.write_bytes(os.urandom(32))
  directory = str(tmp_path / "store")
  store = make_store(disk_dir=directory, disk_bytes=1 << 20,
                     cipher=load_cipher(key_file=str(key)))
  store.store(list(range(2, 66)), filled_cache(0), wait=True)
  store.close()
  files = sorted(os.listdir(directory))
  assert sum(name.endswith(".kv") for name in files) >= 2
  with pytest.raises(ValueError, match="is encrypted; open it with"):
    make_store(disk_dir=directory, disk_bytes=1)
  assert sorted(os.listdir(directory)) == files


def test_evicting_policy_is_refused():
  cfg = tiny_config()
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))

  class Window:
    name = "window"

  with pytest.raises(ValueError, match="policy 'window' evicts"):
    generate_with_store(lm, [[3, 4]], make_store(host_bytes=1 << 20),
                        max_new_tokens=1, policy=Window())


def store_config(**fields):
  store = dict(enabled=True, tiers="host", chunk_size=8, device_mib=1,
               host_mib=1, disk_mib=1, dir="", replacement="lru", key_file="",
               key_env="")
  store.update(fields)
  return ml_collections.ConfigDict(dict(store=store))


def test_config_tiers(tmp_path):
  cfg = tiny_config()
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))
  with pytest.raises(ValueError, match="'host,tape'.*device, host, disk"):
    store_from_config(store_config(tiers="host,tape"), lm)
  with pytest.raises(ValueError, match="unknown replacement rule 'mru'; "
                                       "valid: fifo, lfu, lru"):
    store_from_config(store_config(replacement="mru"), lm)
  with pytest.raises(ValueError, match="config.store.host_mib=0: .*positive"):
    store_from_config(store_config(host_mib=0), lm)
  with pytest.raises(ValueError, match="config.store.dir is empty"):
    store_from_config(store_config(tiers="disk"), lm)
  store = store_from_config(store_config(
      tiers="disk, device", replacement="lfu", dir=str(tmp_path)), lm)
  assert [t.name for t in store.tiers] == ["device", "disk"]
  assert [t.replacement.name for t in store.tiers] == ["lfu", "lfu"]
  assert store.tiers[0].replacement is not store.tiers[1].replacement
  assert store_from_config(store_config(enabled=False), lm) is None

