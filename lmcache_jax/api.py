"""The Python API: load a model, then text in, text (or perplexity) out.

  from lmcache_jax import api
  from policies import EVICTION, REPLACEMENT
  from lmcache_jax.store import HostTier

  model = api.load("smollm2-135m")     # a preset, a .gguf file or a HF folder
  snapkv = EVICTION.make("snapkv", budget=256)
  print(model.generate("Name three planets.", policy=snapkv, kv_bits=4))
  print(model.perplexity(text, policy=snapkv))
  model.store = model.make_store([HostTier(2**30, REPLACEMENT.make("lru"))])

Policies, quantization plans and stores are plain objects handed in: an
eviction policy (``lmcache_jax.cache.policy.CachePolicy``; the named ones live
in ``policies/``), a ``QuantPlan`` or ``kv_bits`` (a uniform plan), a
``KVStore``. No config is needed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax import progress
from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy, KeepAll
from lmcache_jax.data import shakespeare
from lmcache_jax.engine import calibration, steps
from lmcache_jax.engine.generate import generate as generate_tokens
from lmcache_jax.engine.reuse import generate_with_store
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.models import LoadedModel
from lmcache_jax.models import load as load_model
from lmcache_jax.numerics.formats import format_for_bits
from lmcache_jax.quant import QuantPlan
from lmcache_jax.quant.plan import EXACT_TOKENS
from lmcache_jax.store import KVStore, Layout, Tier, model_fingerprint

# Tokens per forward pass while an evicting policy streams a text: the
# working room its cache holds beside the budget.
WORKING_CHUNK = 64


def load(name_or_path: str = "smollm2-135m", dtype=None) -> "Model":
  """A model by preset (``smollm2-135m`` has real weights), ``.gguf`` path or
  Hugging Face folder (``config.json``, ``*.safetensors``, ``tokenizer.json``);
  ``dtype`` defaults to bfloat16 on accelerators, float32 on the CPU."""
  return Model(load_model(name_or_path, dtype))


@dataclasses.dataclass
class Model:
  """A loaded model and, optionally, the prefix store its generations use."""
  lm: LoadedModel
  store: KVStore | None = None
  _shifts: np.ndarray | None = dataclasses.field(default=None, repr=False)

  @property
  def tokenizer(self):
    if self.lm.tokenizer is None:
      raise ValueError(f"{self.lm.source or self.lm.cfg.name} has no tokenizer "
                       f"(random weights?): text in and out needs one; load a "
                       f".gguf file or a Hugging Face folder")
    return self.lm.tokenizer

  def plan(self, kv_bits: int) -> QuantPlan:
    """A uniform ``kv_bits`` plan (2, 3, 4 or 8) in groups of 64 channels
    (or the head dimension, if smaller): head vectors rotated, keys
    centered on their channel means over 512 tokens of Macbeth (measured
    once per model), the sink and recent tokens kept exact
    (``quant.plan.EXACT_TOKENS``)."""
    fmt = format_for_bits(kv_bits).name
    if self._shifts is None:
      tokens = self.tokenizer.encode(shakespeare.load_text("macbeth"))[:512]
      self._shifts = calibration.key_means(calibration.collect(self.lm, tokens))
    return QuantPlan.uniform(self.lm.cfg, fmt, policy=f"uniform-{fmt}",
                             group_size=min(64, self.lm.cfg.head_dim),
                             rotate=True, key_shift=self._shifts,
                             **EXACT_TOKENS)

  def _quant(self, kv_bits: int, quant: QuantPlan | None) -> QuantPlan | None:
    if quant is not None and kv_bits != 16:
      raise ValueError("give kv_bits or a quant plan, not both")
    return quant if quant is not None or kv_bits == 16 else self.plan(kv_bits)

  def new_cache(self, batch: int, capacity: int,
                quant: QuantPlan | None = None) -> KVCache:
    """An empty cache in the model's dtype, quantized by ``quant``."""
    return init_cache(self.lm.cfg, batch, capacity, self.lm.dtype, quant=quant)

  def make_store(self, tiers: list[Tier], *, chunk_size: int = 256,
                 quant: QuantPlan | None = None, cipher=None) -> KVStore:
    """A prefix store over ``tiers`` (fastest first) for this model's caches
    (quantized by ``quant``: generate with the same plan); assign it to
    ``model.store`` to have ``generate`` reuse prefixes through it."""
    template = self.new_cache(1, chunk_size, quant)
    return KVStore(Layout.of(template), tiers,
                   model_fingerprint=model_fingerprint(self.lm),
                   chunk_size=chunk_size, cipher=cipher)

  def generate(self, prompt: str, *, policy: CachePolicy = KeepAll(),
               kv_bits: int = 16, quant: QuantPlan | None = None,
               max_new_tokens: int = 64, chat: bool = True,
               sampling: Sampling = Sampling(), seed: int = 0) -> str:
    """The model's answer to ``prompt`` (in its chat template when ``chat``
    and it has one), with ``policy`` managing the cache, keys and values
    stored at ``kv_bits`` (or by ``quant``), and the prefix loaded from and
    saved to ``self.store`` when set."""
    if not prompt.strip():
      raise ValueError("the prompt is empty: give the model something to "
                       "respond to")
    tokenizer = self.tokenizer
    if chat and tokenizer.chat_template:
      ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
      ids = tokenizer.encode(prompt)
    plan = self._quant(kv_bits, quant)
    if getattr(policy, "budget", 0) >= len(ids) + max_new_tokens:
      policy = KeepAll()  # the budget holds everything: nothing to evict
    policy = policy.bind(self.lm.cfg)
    chunk = self._chunk(policy, 512)
    args = dict(max_new_tokens=max_new_tokens, sampling=sampling,
                key=jax.random.key(seed), policy=policy, prefill_chunk=chunk,
                new_cache=lambda b, s: self.new_cache(b, s, plan))
    if self.store is None:
      tokens = generate_tokens(self.lm, [ids], **args).tokens[0]
    else:
      tokens = generate_with_store(self.lm, [ids], self.store,
                                   **args).generation.tokens[0]
    return tokenizer.decode(tokens, skip_special=True)

  def perplexity(self, text: str, *, policy: CachePolicy = KeepAll(),
                 kv_bits: int = 16, quant: QuantPlan | None = None,
                 num_tokens: int = 2048, chunk: int = 256) -> float:
    """Perplexity of the first ``num_tokens`` + 1 tokens of ``text``, streamed
    ``chunk`` tokens at a time (at most ``WORKING_CHUNK`` under an evicting
    policy) through one cache managed by ``policy``."""
    tokens = np.asarray(self.tokenizer.encode(text), np.int32)
    if len(tokens) < num_tokens + 1:
      raise ValueError(f"the text holds {len(tokens)} tokens; scoring "
                       f"{num_tokens} needs {num_tokens + 1}")
    if isinstance(policy, KeepAll) and num_tokens > self.lm.cfg.max_context:
      raise ValueError(f"{num_tokens} tokens is more than the model has "
                       f"positions for ({self.lm.cfg.max_context}); pass "
                       f"fewer, or an evicting policy")
    plan = self._quant(kv_bits, quant)
    policy = policy.bind(self.lm.cfg)
    chunk = self._chunk(policy, chunk)
    cache = self.new_cache(1, policy.cache_capacity(num_tokens, chunk), plan)
    total = 0.0
    for start in progress.bar(range(0, num_tokens, chunk), desc="perplexity",
                              unit="pass",
                              disable=None if num_tokens > 8 * chunk else True):
      real = min(chunk, num_tokens - start)
      piece = np.zeros((2, chunk), np.int32)
      piece[:, :real] = tokens[start:start + real], tokens[start + 1:
                                                           start + 1 + real]
      nll, cache = steps.forward_nll(
          self.lm.graphdef, self.lm.params, cache, jnp.asarray(piece[:1]),
          jnp.asarray([real], jnp.int32), jnp.asarray(piece[1:]), policy=policy)
      total += float(jnp.sum(nll[0, :real]))
    return float(np.exp(total / num_tokens))

  @staticmethod
  def _chunk(policy: CachePolicy, chunk: int) -> int:
    budget = getattr(policy, "budget", None)
    return chunk if budget is None else max(1, min(chunk, WORKING_CHUNK, budget))
