"""The packed cache on the real SmolLM2-135M: int8 is near-lossless, int4
with an exact recent window stays close (docs/quantization.md has the
2K-token table)."""

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
      ("bf16", None),
      ("int8", QuantPlan.uniform(real_lm.cfg, "int8", group_size=64)),
      ("int4+window", QuantPlan.uniform(real_lm.cfg, "int4", group_size=64,
                                        residual=64))]:
    nll, cache = stream_nll(dataclasses.replace(ctx, quant=plan), tokens, 32)
    ppl[label] = float(np.exp(nll.mean()))
  assert abs(ppl["int8"] / ppl["bf16"] - 1) < 0.01, ppl
  assert abs(ppl["int4+window"] / ppl["bf16"] - 1) < 0.05, ppl


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
  assert len(by_label) == 3 and all(len(r["changes_pct"]) == 2
                                    for r in out["rows"])
  window = by_label[spread.setting_label(64, 16)]
  # a 64-token window over 64 tokens keeps every token exact
  np.testing.assert_allclose(window["changes_pct"], 0.0, atol=1e-3)
  # int8 copies: smaller, and within int8 noise of exact
  int8 = by_label[spread.setting_label(64, 8)]
  assert (window["compression"] < int8["compression"]
          < by_label[spread.setting_label(0, 16)]["compression"])
  np.testing.assert_allclose(int8["changes_pct"], 0.0, atol=0.5)


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
