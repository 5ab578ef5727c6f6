"""quant_table's policies table on the real SmolLM2-135M, shrunk: one row per
(policy, bits), every text, bytes as the cache allocates them; a policy that
does not exist is an error before any work."""

from __future__ import annotations

import numpy as np
import pytest

from configs import default
from experiments import setup
from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import TASKS, quant_table
from lmcache_jax.cache.policy import KeepAll


@pytest.mark.real_model
def test_policy_table_rows(real_lm):
  config = default.get_config()
  config.context = 64
  config.quant.eval_chunk = 32
  config.quant.calibration_tokens = 64
  config.quant.residual = 64          # every token exact: int4 equals bf16
  config.quant.copy_bits = 16
  config.quant.table_texts = "hamlet,othello"
  config.quant.table_bits = "4"
  config.quant.table_policies = "uniform,sensitivity"
  ctx = RunContext(config=config, lm=real_lm, policy=KeepAll())
  out = quant_table.quant_table(ctx)
  rows = {r["policy"]: r for r in out["rows"]}
  assert list(rows) == ["bf16", "uniform", "sensitivity"]
  for name in ("uniform", "sensitivity"):
    row = rows[name]
    assert set(row["ppl"]) == {"hamlet", "othello"}
    np.testing.assert_allclose(list(row["change_pct"].values()), 0.0,
                               atol=1e-3)
    assert row["avg_bits"] <= 4
    assert row["compression"] == rows["bf16"]["kv_bytes"] / row["kv_bytes"]
  assert rows["bf16"]["kv_bytes"] == quant_table.kv_bytes(real_lm.cfg, 64, None)
  with pytest.raises(ValueError, match="config.quant.table='nope'"):
    config.quant.table = "nope"
    quant_table.quant_table(ctx)


UNKNOWN = (r"--config.quant.table_policies: unknown calibration policy "
           r"'kvqant'; did you mean 'kvquant'\?; valid: kivi, kvquant, "
           r"sensitivity, uniform, variance$")


def test_unknown_policy_is_an_error_before_the_model_loads():
  config = default.get_config()
  config.task = "quant_table"
  config.quant.table_policies = "uniform,kvqant"
  with pytest.raises(InputError, match=UNKNOWN):
    setup.check(config, TASKS.names())
  # Called directly, the task refuses it before touching the model (None).
  with pytest.raises(InputError, match=UNKNOWN):
    quant_table.quant_table(RunContext(config=config, lm=None, policy=KeepAll()))
