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
