"""Saving and restoring a conversation (cache + tokens) with orbax-checkpoint.

A restored session continues exactly where it stopped: the cache holds the
KV of every token fed so far, and ``resume`` feeds the next user turn and
decodes. The model's fingerprint is saved alongside, so a session is never
resumed on other weights.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmcache_jax.cache.kv_cache import KVCache, init_cache
from lmcache_jax.cache.policy import CachePolicy, KeepAll
from lmcache_jax.cache.positions import unmoved_origins
from lmcache_jax.engine.generate import Generation, check_prompts, decode
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.prefill import prefill
from lmcache_jax.engine.sampling import Sampling
from lmcache_jax.store.keys import model_fingerprint


@dataclasses.dataclass
class Session:
  """A conversation so far: per sequence, the tokens whose KV is in ``cache``,
  plus the last sampled token of each (not yet fed)."""
  cache: KVCache
  tokens: list[list[int]]
  pending: list[int]


def from_generation(prompts: list[list[int]], generation: Generation) -> Session:
  """The session after ``generate``: prompt + answer fed, the last token pending."""
  return Session(generation.cache,
                 [p + a[:-1] for p, a in zip(prompts, generation.tokens)],
                 [a[-1] for a in generation.tokens])


def save_session(path: str, session: Session, lm: LoadedModel) -> None:
  """Writes the session under the directory ``path`` (which must not exist)."""
  path = os.path.abspath(path)
  width = max(len(t) for t in session.tokens)
  tokens = np.full((len(session.tokens), width), -1, np.int32)
  for row, seq in zip(tokens, session.tokens):
    row[:len(seq)] = seq
  meta = {"fingerprint": model_fingerprint(lm).hex(),
          "batch": session.cache.batch_size,
          "capacity": session.cache.capacity,
          "width": width,
          "pending": [int(t) for t in session.pending],
          "sink_origins": _origin_sinks(session.cache)}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(path, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"cache": session.cache, "tokens": tokens}),
        meta=ocp.args.JsonSave(meta)))


def restore_session(path: str, lm: LoadedModel,
                    like: KVCache | None = None) -> Session:
  """Reads a session saved by ``save_session`` for this same model.

  Args:
    like: an empty cache of the saved shape (e.g. a quantized one); default
      ``init_cache`` in the model's dtype at the saved batch and capacity.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"no saved session at {path!r}")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    meta = ckpt.restore(path, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    if meta["fingerprint"] != model_fingerprint(lm).hex():
      raise ValueError(f"the session at {path!r} was saved with another model "
                       f"or dtype than {lm.cfg.name!r}; restore it with that one")
    if like is None:
      like = init_cache(lm.cfg, meta["batch"], meta["capacity"], lm.dtype)
    if meta.get("sink_origins") is not None and like.sink_origins is None:
      like = like.replace(sink_origins=unmoved_origins(
          like.keys, like.positions, meta["sink_origins"]))
    template = {"cache": like,
                "tokens": np.zeros((meta["batch"], meta["width"]), np.int32)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    state = ckpt.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  tokens = [[int(t) for t in row if t >= 0] for row in np.asarray(state["tokens"])]
  return Session(state["cache"], tokens, meta["pending"])


def _origin_sinks(cache: KVCache) -> int | None:
  """How many sinks the cache keeps origins of (None: no origins)."""
  origins = cache.sink_origins
  return None if origins is None else int(origins.shift.shape[-1])


def resume(lm: LoadedModel, session: Session, turns: list[list[int]], *,
           max_new_tokens: int, sampling: Sampling = Sampling(),
           key: jax.Array | None = None, policy: CachePolicy = KeepAll(),
           prefill_chunk: int = 512) -> tuple[Generation, Session]:
  """Feeds each sequence's pending token and next ``turns[b]``, then decodes.

  The pending token is the answer's last: its end-of-turn token when it
  finished on one, so a turn cut from a chat template must not open with
  that token again (``<|im_end|>`` would be fed twice)."""
  feeds = [[p] + t for p, t in zip(session.pending, turns)]
  check_prompts(feeds, lm.cfg.vocab_size)
  need = max(len(s) + len(f) for s, f in zip(session.tokens, feeds)) + max_new_tokens
  if need > session.cache.capacity:
    raise ValueError(f"the session's cache holds {session.cache.capacity} "
                     f"slots; this turn needs {need}")
  logits, cache = prefill(lm, session.cache, feeds, policy, prefill_chunk)
  generation = decode(lm, cache, logits, max_new_tokens=max_new_tokens,
                      sampling=sampling, key=key, policy=policy)
  fed = [s + f for s, f in zip(session.tokens, feeds)]
  return generation, from_generation(fed, generation)
