"""The Python API: load a model, then text in, text (or perplexity) out.

  from lmcache_jax import api
  from policies import EVICTION, REPLACEMENT
  from lmcache_jax.store import HostTier

  model = api.load("smollm2-135m")     # a preset, a .gguf file or a HF folder
  snapkv = EVICTION.make("snapkv", budget=64)
  print(model.generate("Name three planets.", policy=snapkv, kv_bits=4))
  print(model.perplexity(text, policy=snapkv))
  model.store = model.make_store([HostTier(2**30, REPLACEMENT.make("lru"))])
  answer = model.generate(document + "Who speaks first?")
  print(answer, answer.reused_tokens)   # prompt tokens loaded from the store

Policies, quantization plans and stores are plain objects handed in: an
eviction policy (``lmcache_jax.cache.policy.CachePolicy``; the named ones live
in ``policies/``), a ``QuantPlan`` or ``kv_bits`` (a uniform plan), a
``KVStore``. No config is needed; every default (the plan ``kv_bits`` builds,
chunk sizes) is the command line's, from ``lmcache_jax.defaults``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmcache_jax import defaults, progress
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
from lmcache_jax.store import KVStore, Layout, Tier, model_fingerprint


def load(name_or_path: str = "smollm2-135m", dtype=None) -> "Model":
  """A model by preset (``smollm2-135m`` has real weights), ``.gguf`` path or
  Hugging Face folder (``config.json``, ``*.safetensors``, ``tokenizer.json``);
  ``dtype`` defaults to bfloat16 on accelerators, float32 on the CPU."""
  return Model(load_model(name_or_path, dtype))


class Answer(str):
  """The generated text, a ``str``, with ``prompt_tokens`` (the prompt's
  length in tokens) and ``reused_tokens`` (those loaded from the model's
  store instead of computed: whole chunks of a prefix stored before; 0
  without a store)."""
  prompt_tokens: int
  reused_tokens: int

  def __new__(cls, text: str, *, prompt_tokens: int, reused_tokens: int):
    answer = super().__new__(cls, text)
    answer.prompt_tokens, answer.reused_tokens = prompt_tokens, reused_tokens
    return answer


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

  def plan(self, kv_bits: int, *, group_size: int = defaults.GROUP_SIZE,
           residual: int = defaults.RESIDUAL, sinks: int = defaults.SINKS,
           copy_bits: int = defaults.COPY_BITS) -> QuantPlan:
    """The uniform ``kv_bits`` plan (2, 3, 4 or 8; ``4.0`` is 4) that
    ``--kv_bits`` builds on the command line, with the same defaults
    (``lmcache_jax.defaults``): ``group_size`` channels per scale, head
    vectors rotated, keys centered on their channel means over the first
    ``CALIBRATION_TOKENS`` tokens of ``CALIBRATION_TEXT`` (measured once per
    model), the first ``sinks`` and the ``residual`` newest tokens read
    exact as ``copy_bits`` copies."""
    fmt = format_for_bits(kv_bits).name
    if self._shifts is None:
      text = shakespeare.load_text(defaults.CALIBRATION_TEXT)
      tokens = self.tokenizer.encode(text)[:defaults.CALIBRATION_TOKENS]
      self._shifts = calibration.key_means(calibration.collect(self.lm, tokens))
    return QuantPlan.uniform(self.lm.cfg, fmt, policy="uniform",
                             group_size=group_size, residual=residual,
                             sinks=sinks, rotate=defaults.ROTATE,
                             key_shift=self._shifts if defaults.CENTER_KEYS
                             else None, copy_bits=copy_bits)

  def _quant(self, kv_bits: int, quant: QuantPlan | None) -> QuantPlan | None:
    if kv_bits not in (2, 3, 4, 8, 16):
      raise ValueError(f"kv_bits={kv_bits!r} is not available: use 2, 3, 4 or "
                       f"8 (a uniform plan), 16 for an unquantized cache, or "
                       f"quant= for a calibrated plan (fractional averages)")
    if quant is not None and kv_bits != 16:
      raise ValueError("give kv_bits or a quant plan, not both")
    return quant if quant is not None or kv_bits == 16 else self.plan(kv_bits)

  def new_cache(self, batch: int, capacity: int,
                quant: QuantPlan | None = None) -> KVCache:
    """An empty cache in the model's dtype, quantized by ``quant``."""
    return init_cache(self.lm.cfg, batch, capacity, self.lm.dtype, quant=quant)

  def make_store(self, tiers: list[Tier], *,
                 chunk_size: int = defaults.STORE_CHUNK,
                 quant: QuantPlan | None = None, cipher=None) -> KVStore:
    """A prefix store over ``tiers`` (fastest first) for this model's caches
    (quantized by ``quant``: generate with the same plan); assign it to
    ``model.store`` to have ``generate`` reuse prefixes through it. The
    caller owns it: ``with model.make_store(...) as store:``, or
    ``store.close()``, finishes its writes and releases its tiers."""
    template = self.new_cache(1, chunk_size, quant)
    return KVStore(Layout.of(template), tiers,
                   model_fingerprint=model_fingerprint(self.lm),
                   chunk_size=chunk_size, cipher=cipher)

  def generate(self, prompt: str, *, policy: CachePolicy = KeepAll(),
               kv_bits: int = 16, quant: QuantPlan | None = None,
               max_new_tokens: int = 64, chat: bool = True,
               sampling: Sampling = Sampling(), seed: int = 0) -> Answer:
    """The model's answer to ``prompt`` (in its chat template when ``chat``
    and it has one), with ``policy`` managing the cache, keys and values
    stored at ``kv_bits`` (or by ``quant``), and the prefix loaded from and
    saved to ``self.store`` when set (``Answer.reused_tokens`` says how
    much came from it).

    A policy's budget must fit in the prompt and the tokens it may add, as
    ``--budget`` must on the command line: a larger one would evict nothing.
    """
    if not prompt.strip():
      raise ValueError("the prompt is empty: give the model something to "
                       "respond to")
    tokenizer = self.tokenizer
    if chat and tokenizer.chat_template:
      ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
      ids = tokenizer.encode(prompt)
    plan = self._quant(kv_bits, quant)
    _check_budget(policy, len(ids), max_new_tokens)
    policy = policy.bind(self.lm.cfg)
    chunk = defaults.working_chunk(policy, defaults.PREFILL_CHUNK)
    args = dict(max_new_tokens=max_new_tokens, sampling=sampling,
                key=jax.random.key(seed), policy=policy, prefill_chunk=chunk,
                new_cache=lambda b, s: self.new_cache(b, s, plan))
    if self.store is None:
      tokens, reused = generate_tokens(self.lm, [ids], **args).tokens[0], 0
    else:
      result = generate_with_store(self.lm, [ids], self.store, **args)
      tokens, reused = result.generation.tokens[0], result.hit_tokens[0]
    return Answer(tokenizer.decode(tokens, skip_special=True),
                  prompt_tokens=len(ids), reused_tokens=reused)

  def perplexity(self, text: str, *, policy: CachePolicy = KeepAll(),
                 kv_bits: int = 16, quant: QuantPlan | None = None,
                 num_tokens: int = 2048,
                 chunk: int = defaults.SCORE_CHUNK) -> float:
    """Perplexity of the first ``num_tokens`` + 1 tokens of ``text``, streamed
    ``chunk`` tokens at a time (under an evicting policy at most
    ``defaults.WORKING_CHUNK`` and its budget) through one cache managed by
    ``policy``."""
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
    chunk = defaults.working_chunk(policy, chunk)
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


def _check_budget(policy: CachePolicy, prompt_tokens: int,
                  max_new_tokens: int) -> None:
  """Raises when ``policy``'s budget is larger than the prompt and the
  tokens it may add: the command line's rule (``--budget``)."""
  budget, limit = getattr(policy, "budget", None), prompt_tokens + max_new_tokens
  if budget is not None and budget > limit:
    raise ValueError(
        f"policy {policy.name!r}: budget {budget} tokens is larger than the "
        f"prompt and the tokens it may add ({prompt_tokens} + {max_new_tokens}"
        f" = {limit}); use a budget of at most {limit}, or KeepAll() (the "
        f"full cache)")
