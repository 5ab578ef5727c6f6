"""Saving and loading quant plans: JSON with formats by name beside an .npz,
written without touching anything else in the directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from lmcache_jax.quant import QuantPlan
from lmcache_jax.quant.plan import ARRAYS_FILE, PLAN_FILE

CFG = tiny_config(head_dim=32, hidden_size=64, num_heads=4)
FORMATS = (("int4", "int2"), ("fp8", "int8"), ("int3", "int4"))


def full_plan() -> QuantPlan:
  """Every knob away from its default, so a round trip that drops one fails."""
  rng = np.random.default_rng(0)
  scale = rng.uniform(0.5, 2, (3, 2, 32)).astype(np.float32)
  return QuantPlan(FORMATS, scale, group_size=16, residual=8, sinks=2,
                   policy="kvquant", rotate=True, key_shift=scale - 1,
                   copy_bits=8, outliers=2)


def assert_same(a: QuantPlan, b: QuantPlan) -> None:
  for name in ("formats", "group_size", "residual", "sinks", "policy",
               "rotate", "copy_bits", "outliers", "key_layout", "key_group"):
    assert getattr(a, name) == getattr(b, name), name
  np.testing.assert_array_equal(a.key_scale, b.key_scale)
  if a.key_shift is None:
    assert b.key_shift is None
  else:
    np.testing.assert_array_equal(a.key_shift, b.key_shift)


def test_saving_into_a_directory_keeps_what_it_holds(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  (tmp_path / "kv_store").mkdir()
  (tmp_path / "kv_store" / "chunk.bin").write_bytes(b"\x01\x02")
  assert full_plan().save(tmp_path) == tmp_path
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "kv_store", PLAN_FILE, ARRAYS_FILE, "results.json"]
  assert (tmp_path / "results.json").read_text() == "{}"
  assert (tmp_path / "kv_store" / "chunk.bin").read_bytes() == b"\x01\x02"


def test_round_trip_is_equal(tmp_path):
  plan = full_plan()
  assert_same(QuantPlan.load(plan.save(tmp_path / "a"), CFG), plan)
  bare = QuantPlan.uniform(CFG, "int4", group_size=32)
  assert_same(QuantPlan.load(bare.save(tmp_path / "b"), CFG), bare)
  channel = QuantPlan.uniform(CFG, "int3", group_size=32, residual=16,
                              key_layout="channel", key_group=16)
  assert_same(QuantPlan.load(channel.save(tmp_path / "c"), CFG), channel)


def test_formats_are_saved_by_name(tmp_path):
  """Names, not positions in the format registry (a dict whose order may
  change), so a plan reads back the same whatever the registry's order."""
  full_plan().save(tmp_path)
  record = json.loads((tmp_path / PLAN_FILE).read_text())
  assert record["formats"] == [list(row) for row in FORMATS]


def test_an_existing_plan_is_replaced_only_when_asked(tmp_path):
  first = full_plan()
  first.save(tmp_path)
  second = QuantPlan.uniform(CFG, "int8", group_size=32)
  with pytest.raises(ValueError, match=f"{PLAN_FILE} already holds a quant "
                     "plan; save to another directory, or pass overwrite="
                     "True") as error:
    second.save(tmp_path)
  assert "\n" not in str(error.value)
  assert_same(QuantPlan.load(tmp_path), first)
  second.save(tmp_path, overwrite=True)
  assert_same(QuantPlan.load(tmp_path), second)
  assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_FILE, ARRAYS_FILE]


def test_unreadable_or_torn_plans_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no quant plan at .*missing"):
    QuantPlan.load(tmp_path / "missing")
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="it is a file, not a directory"):
    full_plan().save(tmp_path / "file")
  full_plan().save(tmp_path / "a")
  QuantPlan.uniform(CFG, "int8", group_size=32).save(tmp_path / "b")
  # the arrays of another save beside this record: refused, not mixed
  (tmp_path / "a" / ARRAYS_FILE).write_bytes(
      (tmp_path / "b" / ARRAYS_FILE).read_bytes())
  with pytest.raises(ValueError, match="is not the one .* was saved with"):
    QuantPlan.load(tmp_path / "a")
  (tmp_path / "b" / PLAN_FILE).write_text("{")
  with pytest.raises(ValueError, match="is unreadable"):
    QuantPlan.load(tmp_path / "b")


def test_the_command_line_refuses_to_replace_a_plan_before_loading(tmp_path):
  from configs import default
  from experiments import setup
  full_plan().save(tmp_path)
  config = default.get_config()
  config.task = "generate"
  config.quant.save_plan = str(tmp_path)
  with pytest.raises(ValueError, match=r"--config.quant.save_plan: .*"
                     rf"{PLAN_FILE} already holds a quant plan; .*"
                     r"--config.quant.overwrite_plan=True"):
    setup.check(config, ["generate"], model=False)
  config.quant.overwrite_plan = True
  setup.check(config, ["generate"], model=False)
