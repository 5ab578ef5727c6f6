"""Kept tokens against NVIDIA's kvpress, on the same GGUF weights (optional).

Needs the ``parity`` extra (torch, transformers, kvpress), which the default
install leaves out; without it the test is skipped:

  pip install -e '.[dev,parity]'
  python -m pytest -q tests/test_parity_kvpress.py

Each pair compresses the same real-prose prompts (a needle in *Hamlet*) once
after prefill, both keeping ``int(n * (1 - RATIO))`` of the ``n`` tokens, and
must keep the same set in at least 95% of the (layer, prompt, kv head) rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
kvpress = pytest.importorskip("kvpress")

from experiments.texts import load_eval_text  # noqa: E402
from lmcache_jax.cache.kv_cache import init_cache  # noqa: E402
from lmcache_jax.data import needle  # noqa: E402
from lmcache_jax.engine.prefill import prefill  # noqa: E402
from lmcache_jax.models.assets import default_gguf_path  # noqa: E402
from policies.registry import EVICTION  # noqa: E402

pytestmark = pytest.mark.real_model

RATIO = 0.5
LENGTH = 1024
DEPTHS = (0.1, 0.5, 0.9)
# Ours -> the kvpress press it reproduces (windows matched: kvpress's
# SnapKV observes 64 queries by default, ours 32).
PAIRS = {
    "attention_sink": lambda: kvpress.StreamingLLMPress(
        compression_ratio=RATIO, n_sink=4),
    "tova": lambda: kvpress.TOVAPress(compression_ratio=RATIO),
    "knorm": lambda: kvpress.KnormPress(compression_ratio=RATIO),
    "snapkv(window=64)": lambda: kvpress.SnapKVPress(
        compression_ratio=RATIO, window_size=64, kernel_size=5),
}


@pytest.fixture(scope="module")
def prompts(real_lm):
  text = load_eval_text("hamlet")
  return [needle.needle(real_lm.tokenizer, text, LENGTH, depth, seed=i).prompt
          for i, depth in enumerate(DEPTHS)]


@pytest.fixture(scope="module")
def hf_model():
  transformers.utils.logging.disable_progress_bar()
  path = default_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.eval()


def kvpress_kept(model, press, prompt) -> np.ndarray:
  """[L, K, kept] positions kvpress keeps, found by matching each kept key
  to the keys of an uncompressed prefill."""
  ids = torch.tensor([prompt])
  with torch.no_grad():
    full = model(ids, past_key_values=transformers.DynamicCache()).past_key_values
    pressed = transformers.DynamicCache()
    with press(model):
      model(ids, past_key_values=pressed)
  kept = []
  for full_layer, pressed_layer in zip(full.layers, pressed.layers):
    distance = torch.cdist(pressed_layer.keys[0], full_layer.keys[0])
    kept.append(distance.argmin(-1).numpy())
  return np.stack(kept)


def our_kept(lm, spec, prompts) -> np.ndarray:
  """[L, B, K, S] positions our policy keeps (-1 = empty slot)."""
  (n,) = {len(p) for p in prompts}
  policy = EVICTION.make(spec, budget=int(n * (1 - RATIO)))
  cache = init_cache(lm.cfg, len(prompts), n, jnp.float32)
  return np.asarray(prefill(lm, cache, prompts, policy, chunk=512)[1].positions)


@pytest.mark.parametrize("spec", sorted(PAIRS))
def test_kept_tokens_match_kvpress(real_lm, hf_model, prompts, spec):
  ours = our_kept(real_lm, spec, prompts)
  agree = total = 0
  for b, prompt in enumerate(prompts):
    theirs = kvpress_kept(hf_model, PAIRS[spec](), prompt)
    for layer, head in np.ndindex(theirs.shape[:2]):
      row = ours[layer, b, head]
      agree += set(row[row >= 0].tolist()) == set(theirs[layer, head].tolist())
      total += 1
  assert agree >= 0.95 * total, (f"{spec}: the same tokens kept in {agree} of "
                                 f"{total} rows")
