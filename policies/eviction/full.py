"""``full``: keep every token (the baseline every ablation compares against)."""

from lmcache_jax.cache.policy import KeepAll
from policies.registry import EVICTION

EVICTION.register("full")(KeepAll)
