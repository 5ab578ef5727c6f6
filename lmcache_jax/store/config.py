"""Builds a store from the ``config.store`` section of a run.

Fields (defaults in ``configs/default.py``):
  enabled      bool   use a store at all
  tiers        str    comma list of device, host, disk (e.g. "host,disk")
  chunk_size   int    tokens per chunk (256)
  device_mib, host_mib, disk_mib   int   per-tier capacities in MiB
  dir          str    disk tier directory
  policy       str    tier policy: lru, lfu, fifo
  key_file     str    AES-256 key file; encrypts host and disk tiers
  key_env      str    or the environment variable holding the key
"""

from __future__ import annotations

from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.store.crypto import load_cipher
from lmcache_jax.store.keys import model_fingerprint
from lmcache_jax.store.layout import Layout
from lmcache_jax.store.store import KVStore

VALID_TIERS = ("device", "host", "disk")


def from_config(store_config, lm: LoadedModel, cache=None) -> KVStore | None:
  """A store for ``lm``'s caches (or ones shaped like ``cache``); None if disabled."""
  if not store_config.get("enabled", False):
    return None
  tiers = [t.strip() for t in str(store_config.tiers).split(",") if t.strip()]
  bad = sorted(set(tiers) - set(VALID_TIERS))
  if bad or not tiers:
    raise ValueError(f"config.store.tiers={store_config.tiers!r}: give a comma "
                     f"list of {', '.join(VALID_TIERS)}")
  mib = lambda name: int(store_config[f"{name}_mib"]) * 2**20  # noqa: E731
  chunk_size = int(store_config.chunk_size)
  if cache is None:
    cache = init_cache(lm.cfg, 1, max(chunk_size, 1), lm.dtype)
  return KVStore(
      Layout.of(cache), model_fingerprint=model_fingerprint(lm),
      chunk_size=chunk_size,
      device_bytes=mib("device") if "device" in tiers else None,
      host_bytes=mib("host") if "host" in tiers else None,
      disk_dir=store_config.dir if "disk" in tiers else None,
      disk_bytes=mib("disk") if "disk" in tiers else None,
      policy=store_config.get("policy", "lru"),
      cipher=load_cipher(store_config.get("key_file", ""),
                         store_config.get("key_env", "")))
