"""The benchmark dispatcher, its timing helper and the model suite (tiny shapes)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs.bench import model as model_config
from experiments import benchmarks
from experiments.benchmarks import kv_decode, model as model_suite
from conftest import tiny_config, tiny_weights
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.models.llama import from_weights
from lmcache_jax.models.loaded import LoadedModel
from lmcache_jax.models.presets import get_preset

ROOT = pathlib.Path(__file__).parent.parent


def test_suites_found_by_module_name():
  assert "model" in benchmarks.suites()
  assert not any(name.startswith("_") for name in benchmarks.suites())
  with pytest.raises(ValueError, match="unknown benchmark suite 'nope'; valid: .*model"):
    benchmarks.load_suite("nope")


def test_timed_takes_the_median_after_warmup():
  calls = []
  durations = iter([99.0, 3.0, 1.0, 2.0])

  def fn():
    calls.append(next(durations))
    return jnp.asarray(calls[-1])

  out = benchmarks.timed(fn, warmup=1, repeats=3)
  assert calls == [99.0, 3.0, 1.0, 2.0] and out["runs"] == 3
  assert float(out["result"]) == 2.0
  assert out["median_s"] >= out["min_s"] >= 0
  once = benchmarks.timed(lambda: jnp.zeros(()), warmup=0, repeats=5, max_seconds=0.0)
  assert once["runs"] == 1


def test_timed_back_to_back_issues_whole_batches():
  calls = []

  def fn():
    calls.append(len(calls))
    return jnp.asarray(float(len(calls)))

  out = benchmarks.timed_back_to_back(fn, calls=4, repeats=3)
  assert len(calls) == 4 * (1 + 3) and out["runs"] == 3
  assert out["median_s"] >= out["min_s"] > 0
  with pytest.raises(ValueError, match="calls \\(0\\)"):
    benchmarks.timed_back_to_back(fn, calls=0)


@pytest.mark.parametrize("spec", ["4096:full", "4096x16", "ax16:full", "4096x16:h2o(("])
def test_bad_workload(spec):
  with pytest.raises(ValueError):
    model_suite.Workload.parse(spec)


def test_memory_estimate_matches_the_cache():
  cfg = get_preset("tiny")
  cache = init_cache(cfg, 3, 40, jnp.bfloat16)
  assert cache.nbytes == model_suite.cache_bytes(cfg, 3, 40, 2) + 3 * 4  # + lengths
  # The seed workload's arithmetic, as configs/bench/model.py states it.
  big = get_preset("llama2-13b")
  kv = lambda b, s: 2 * big.num_layers * b * big.num_kv_heads * s * big.head_dim * 2  # noqa: E731
  assert kv(16, 4096) / 2**30 == pytest.approx(50.0)
  assert kv(16, 32768) / 2**30 == pytest.approx(400.0)
  assert model_suite.weight_bytes(big, 2) / 2**30 == pytest.approx(24.24, abs=0.01)


def test_model_suite_runs_and_skips_what_does_not_fit(monkeypatch):
  config = model_config.get_config("runlocal")
  config.hf_baseline = False
  config.workloads = ("64x2:full", "128x2:attention_sink(budget=32)")
  config.decode_tokens = 4
  config.prefill_chunk = 16
  config.repeats = 1
  config.kv_decode.workloads = ()
  out = model_suite.run(config)
  rows = {r["policy"]: r for r in out["rows"]}
  assert set(rows) == {"full", "attention_sink(budget=32)"}
  for row in rows.values():
    assert row["note"] == "" and row["ttft_s"] > 0 and row["decode_tok_s"] > 0
  assert rows["attention_sink(budget=32)"]["kv_gib"] < 2 * rows["full"]["kv_gib"]
  assert out["hf_check"] == "not run: disabled"

  monkeypatch.setattr(benchmarks, "device_memory", lambda: {"limit": 1 << 10})
  config.workloads = ("64x2:full",)
  skipped = model_suite.run(config)["rows"][0]
  assert skipped["note"].startswith("skipped: needs") and "ttft_s" not in skipped


def test_quantized_cache_decode_rows():
  """The model suite's int-cache rows: a filled cache decodes, and the int4
  cache is the smaller one."""
  cfg = tiny_config(head_dim=32, max_context=256)
  lm = LoadedModel.from_module(from_weights(cfg, tiny_weights(cfg), jnp.float32))
  rows = {kv: kv_decode.bench_kv_decode(
      lm, kv_decode.KVWorkload.parse(f"96x2:{kv}"), 4, bandwidth=1e9,
      weight_bytes=1) for kv in ("int4", "dense")}
  for row in rows.values():
    assert row["decode_tok_s"] > 0 and row["step_gb"] > 0
  assert rows["int4"]["kv_gib"] < 0.5 * rows["dense"]["kv_gib"]
  with pytest.raises(ValueError, match="not CONTEXTxBATCH:KV"):
    kv_decode.KVWorkload.parse("32768x16:bf16")


def test_transformers_computes_what_we_compute():
  pytest.importorskip("transformers")
  pytest.importorskip("torch")
  from experiments.benchmarks import _hf_baseline
  check = _hf_baseline.check_same_function("cpu")
  assert check["same_greedy_tokens"] and check["relative_logit_error"] < 1e-4


def test_cli_unknown_suite():
  proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--suite=nope"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0 and "valid: " in proc.stderr and "model" in proc.stderr
