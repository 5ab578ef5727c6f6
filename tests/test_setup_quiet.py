"""The harness prints a quant plan in one line (per-head formats when
verbose)."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest

from conftest import tiny_config, tiny_weights
from experiments import setup
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel

CFG = tiny_config(head_dim=32, num_heads=6, num_kv_heads=3, hidden_size=64)
QUANT = {"kv_bits": 4, "calibration": "uniform", "center_keys": False,
         "group_size": 32, "residual": 4, "sinks": 2}


@pytest.fixture(scope="module")
def lm():
  return LoadedModel.from_module(from_weights(CFG, tiny_weights(CFG),
                                              jnp.float32))


def test_default_verbosity_prints_one_line_per_plan(lm, tmp_path, caplog,
                                                     capsys):
  caplog.set_level(logging.INFO)   # experiments.run's default (absl's 0)
  path = tmp_path / "plan"
  setup.quant_plan({**QUANT, "save_plan": str(path)}, lm)
  setup.quant_plan({"plan": str(path)}, lm)
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
      "plan[uniform] avg 4.00 bits; {'int4': 9}; group 32, residual 4, "
      "sinks 2, Hadamard-rotated, int8 copies",
      f"saved quant plan to {path}",
      f"loaded quant plan {path}: plan[uniform] avg 4.00 bits; "
      "{'int4': 9}; group 32, residual 4, sinks 2, Hadamard-rotated, int8 "
      "copies"]


def test_verbose_adds_the_formats_per_head(lm, tmp_path, caplog, capsys):
  caplog.set_level(logging.DEBUG)  # experiments.run -v=1
  setup.quant_plan({**QUANT, "save_plan": str(tmp_path / "plan")}, lm)
  out = capsys.readouterr().out.splitlines()
  assert out[1] == "  per layer (heads): 4/4/4 4/4/4 4/4/4"
