"""A saved and restored session continues exactly like one never interrupted."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lmcache_jax.engine.generate import generate
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.engine.session import (from_generation, restore_session,
                                        resume, save_session)
from lmcache_jax.models.llama import from_weights
from conftest import tiny_config, tiny_weights
from store_helpers import tokens_for


def test_save_restore_resume(tmp_path):
  cfg = tiny_config()
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))
  prompts = [tokens_for(1, 20), tokens_for(2, 13)]
  turns = [tokens_for(3, 7), tokens_for(4, 9)]
  first = generate(lm, prompts, max_new_tokens=5, capacity=64,
                   stop_tokens=(-1,))
  session = from_generation(prompts, first)
  save_session(str(tmp_path / "s"), session, lm)
  restored = restore_session(str(tmp_path / "s"), lm)
  assert restored.tokens == session.tokens and restored.pending == session.pending
  for got, want in zip(restored.cache.keys, session.cache.keys):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(restored.cache.lengths, session.cache.lengths)

  again, _ = resume(lm, restored, turns, max_new_tokens=4)
  whole = [p + a + t for p, a, t in zip(prompts, first.tokens, turns)]
  cold = generate(lm, whole, max_new_tokens=4)
  assert again.tokens == cold.tokens
  np.testing.assert_allclose(again.prompt_logits, cold.prompt_logits,
                             rtol=1e-5, atol=1e-5)

  other_cfg = tiny_config(name="other")
  other = LoadedModel.from_module(
      from_weights(other_cfg, tiny_weights(other_cfg, seed=1), jnp.float32))
  with pytest.raises(ValueError, match="another model"):
    restore_session(str(tmp_path / "s"), other)
  with pytest.raises(ValueError, match="no saved session"):
    restore_session(str(tmp_path / "absent"), lm)
