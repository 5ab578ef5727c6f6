"""The packed cache on SmolLM2-135M-Instruct (4-bit Q4_1 GGUF weights,
dequantized to float32): int8 is near-lossless, int4 with an exact recent
window stays close (docs/quantization.md has the 2K-token table).

The figures were measured on the CPU in float32 by these tests' own
computations (`python -m pytest -n 0 tests/test_quant_real.py`); the
tolerances are far above float32 noise and below the gaps between settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.context import RunContext
from experiments.tasks.perplexity import stream_nll
from lmcache_jax.cache.policy import KeepAll
from lmcache_jax.data import shakespeare
from lmcache_jax.quant.plan import QuantPlan

pytestmark = pytest.mark.real_model


def test_quantized_perplexity_on_hamlet(real_lm):
  tokens = np.asarray(real_lm.tokenizer.encode(
      shakespeare.load_text("hamlet")))[:257]
  ctx = RunContext(config=None, lm=real_lm, policy=KeepAll())
  ppl = {}
  for label, plan in [
      ("dense", None),
      ("int8", QuantPlan.uniform(real_lm.cfg, "int8", group_size=64)),
      ("int4+window", QuantPlan.uniform(real_lm.cfg, "int4", group_size=64,
                                        residual=64))]:
    nll, cache = stream_nll(dataclasses.replace(ctx, quant=plan), tokens, 32)
    ppl[label] = float(np.exp(nll.mean()))
  assert ppl == pytest.approx(
      {"dense": 15.9638, "int8": 15.9048, "int4+window": 16.1977}, rel=1e-3)


def test_quant_spread_reports_every_window(real_lm):
  from configs import default
  from experiments.tasks import quant_spread as spread
  config = default.get_config()
  config.context = 64
  config.quant.calibration_tokens = 64
  ctx = RunContext(config=config, lm=real_lm, policy=KeepAll())
  out = spread.quant_spread(ctx, windows=("hamlet@0", "lear@100"),
                            settings=((0, 16), (64, 16), (64, 8)))
  by_label = {r["setting"]: r for r in out["rows"]}
  # Per setting: % perplexity change on hamlet@0 and lear@100, compression.
  measured = {(0, 16): ([5.5022, 5.3097], 2.70423),
              # a 64-token window over 64 tokens keeps every token exact
              (64, 16): ([0.0, 0.0], 0.71375),
              # int8 copies of that window: smaller, near exact
              (64, 8): ([0.1987, 0.5062], 1.11770)}
  assert len(by_label) == len(measured)
  for (window, copy_bits), (changes, compression) in measured.items():
    row = by_label[spread.setting_label(window, copy_bits)]
    np.testing.assert_allclose(row["changes_pct"], changes, atol=0.01)
    assert row["compression"] == pytest.approx(compression, rel=1e-5)


def test_quant_spread_windows_and_summary():
  from experiments.tasks import quant_spread as spread
  assert spread.summary([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
  assert spread.summary([1.5]) == (1.5, 0.0)
  assert spread.parse_settings("32:8, 64:16") == ((32, 8), (64, 16))
  assert spread.parse_settings("") == ()
  with pytest.raises(ValueError, match="WINDOW:COPY_BITS"):
    spread.parse_settings("32:4")

  class Tokens:
    """100 ids for any text; BOS (-1) first when `bos`."""
    def __init__(self, bos=False):
      self.bos = bos

    def encode(self, text, add_bos=None):
      first = [-1] if self.bos and add_bos is not False else []
      return first + (list(range(100)) if text else [])

  assert list(spread.window_tokens(Tokens(), "hamlet@10", 5)) == list(range(10, 16))
  assert list(spread.window_tokens(Tokens(bos=True), "hamlet@10", 5)) == [
      -1, *range(10, 15)]
  with pytest.raises(ValueError, match="play@offset"):
    spread.window_tokens(Tokens(), "hamlet", 5)
  with pytest.raises(ValueError, match="needs 106 tokens; hamlet has 100"):
    spread.window_tokens(Tokens(), "hamlet@100", 5)
