"""The benchmark dispatcher, its timing helpers, and every suite built on the
CPU at tiny shapes (so a suite that no longer runs fails here, not on the
card), with their memory sizing."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.bench import kernels as kernels_config
from configs.bench import model as model_config
from configs.bench import reuse as reuse_config
from experiments import benchmarks
from experiments.benchmarks import _kv_decode as kv_decode
from experiments.benchmarks import model as model_suite
from lmcache_jax.engine import calibration
from lmcache_jax.cache.kv_cache import init_cache, tree_nbytes
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


def test_model_suite_skips_what_does_not_fit(monkeypatch):
  config = shrunk_model_config()
  config.workloads = ("64x2:full",)
  config.kv_decode.workloads = ()
  monkeypatch.setattr(benchmarks, "device_memory", lambda: {"limit": 1 << 10})
  skipped = model_suite.run(config)["rows"][0]
  assert skipped["note"].startswith("skipped: needs") and "ttft_s" not in skipped


def test_bad_kv_workload():
  with pytest.raises(ValueError, match="not CONTEXTxBATCH:KV"):
    kv_decode.KVWorkload.parse("32768x16:bf16")


def shrunk_model_config():
  """The model suite's CPU run, its kv_decode rows included, made smaller."""
  config = model_config.get_config("runlocal")
  config.hf_baseline = False
  config.workloads = ("64x2:full", "128x2:attention_sink(budget=32)")
  config.decode_tokens = 4
  config.prefill_chunk = 16
  config.repeats = 1
  config.kv_decode.workloads = ("64x1:int4", "64x1:dense")
  return config


# Every suite's rows, built on the CPU at a size that runs in seconds: a
# suite that no longer runs fails here, not on the card.
SHRUNK = {"model": shrunk_model_config,
          "kernels": lambda: kernels_config.get_config("runlocal"),
          "reuse": lambda: reuse_config.get_config("runlocal")}


@pytest.fixture
def quick_timing(monkeypatch):
  """Each timed call runs once: these tests check what a suite builds."""
  timed, back_to_back = benchmarks.timed, benchmarks.timed_back_to_back
  monkeypatch.setattr(benchmarks, "timed", lambda fn, **kw: timed(
      fn, warmup=0, repeats=1, max_seconds=kw.get("max_seconds")))
  monkeypatch.setattr(benchmarks, "timed_back_to_back",
                      lambda fn, **kw: back_to_back(fn, calls=1, repeats=1))


def test_every_suite_has_a_shrunk_run():
  assert set(SHRUNK) == set(benchmarks.suites())


@pytest.mark.parametrize("suite", sorted(SHRUNK))
def test_every_suite_builds_its_rows_on_the_cpu(suite, quick_timing):
  out = benchmarks.load_suite(suite).run(SHRUNK[suite]())
  assert out["rows"] and not [n for n in out.get("notes", ()) if "fail" in n]
  assert not [r for r in out["rows"] if r.get("note", "").startswith("skip")]
  CHECKS[suite](out)


def check_model_rows(out):
  rows = {r.get("policy") or r["kv"]: r for r in out["rows"]}
  assert set(rows) == {"full", "attention_sink(budget=32)", "int4", "dense"}
  for row in rows.values():
    assert row["decode_tok_s"] > 0 and row["step_gb"] > 0
  assert rows["full"]["ttft_s"] > 0
  assert rows["attention_sink(budget=32)"]["kv_gib"] < 2 * rows["full"]["kv_gib"]
  assert rows["int4"]["kv_gib"] < 0.5 * rows["dense"]["kv_gib"]
  assert out["hf_check"] == "not run: disabled"


def check_kernel_rows(out):
  whats = [r["what"] for r in out["rows"]]
  assert len(whats) == 10 and whats[0] == "copy bandwidth"
  assert all(r["ms"] > 0 and r["MB moved"] > 0 for r in out["rows"][1:])
  assert [r["what"] for r in out["rows"] if "speed-up vs bf16" in r] == [
      "int4 attend (kernel + merge + mass)",
      "int4 attend, rotated + centered storage",
      "int4 attend, rotated + centered, no mass"]


def check_reuse_rows(out):
  hits = {(r["format"], r["hit"]): r for r in out["rows"]}
  assert set(hits) == {(f, h) for f in ("bf16", "int4")
                       for h in ("none (recompute)", "host", "disk", "device")}
  for (fmt, hit), row in hits.items():
    assert row["ttft_s"] > 0
    if hit != "none (recompute)":
      assert row["hit_tokens"] == 192 and row["tiers"] == f"{hit}:3"


CHECKS = {"model": check_model_rows, "kernels": check_kernel_rows,
          "reuse": check_reuse_rows}


@pytest.fixture(scope="module")
def random_smollm():
  from lmcache_jax import models
  lm = models.load("random:smollm2-135m", jnp.float32, seed=0)
  return lm, kv_decode.default_plan(lm, 4)


def test_kv_decode_int_rows_store_as_kv_bits_does(random_smollm):
  """The int4 rows' plan is --kv_bits=4's: uniform int4 in groups of 64,
  rotated, int8 copies of 4 sinks and the latest 32 tokens, and keys
  centered on the model's means over 512 calibration tokens."""
  lm, plan = random_smollm
  cfg = lm.cfg
  assert plan.formats == (("int4",) * cfg.num_kv_heads,) * cfg.num_layers
  assert (plan.group_size, plan.sinks, plan.residual, plan.copy_bits,
          plan.rotate) == (64, 4, 32, 8, True)
  assert plan.key_shift is not None
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 512).tolist()
  means = calibration.key_means(calibration.collect(lm, ids))
  np.testing.assert_allclose(plan.key_shift, means, rtol=1e-6)


def test_kv_decode_sizes_each_row_before_running_it(random_smollm,
                                                    monkeypatch):
  lm, plan = random_smollm
  cfg, dtype = lm.cfg, jnp.float32
  weights = tree_nbytes(lm.params)
  work = {kv: kv_decode.KVWorkload.parse(f"512x4:{kv}")
          for kv in ("int4", "dense")}
  need = {kv: kv_decode.needed_bytes(cfg, w, dtype,
                                     plan if kv == "int4" else None, weights)
          for kv, w in work.items()}
  # the dense cache's exact bytes: keys and values, positions and scores,
  # lengths; the step's float32 slot logits and vocabulary logits, twice
  slots = cfg.num_layers * 4 * cfg.num_kv_heads * 512
  step = 2 * 4 * cfg.num_heads * 512 * 4 + 2 * 4 * cfg.vocab_size * 4
  assert need["dense"] == (weights + slots * (2 * cfg.head_dim * 4 + 8)
                           + 4 * 4 + step)
  assert need["int4"] == (weights + step + tree_nbytes(
      init_cache(cfg, 4, 512, dtype, quant=plan)))
  assert need["int4"] < need["dense"]
  # a card between the two: the dense row is skipped with both numbers
  limit = (need["int4"] + need["dense"]) // 2
  monkeypatch.setattr(benchmarks, "device_memory", lambda: {"limit": limit})
  monkeypatch.setattr(kv_decode.models, "load", lambda *a, **k: lm)
  monkeypatch.setattr(kv_decode, "default_plan", lambda lm, bits: plan)
  ran = []
  monkeypatch.setattr(kv_decode, "bench_kv_decode",
                      lambda lm, w, *a: ran.append(str(w)) or {"kv": w.kv})
  config = model_config.get_config("runlocal").kv_decode
  config.workloads = ("512x4:int4", "512x4:dense")
  rows = kv_decode.run_kv_decode(config, bandwidth=1e9)
  assert ran == ["512x4:int4"] and rows[0] == {"kv": "int4"}
  assert rows[1]["kv"] == "dense" and rows[1]["note"] == (
      f"skipped: needs ~{need['dense'] / 2**30:.1f} GiB, the card gives "
      f"{limit / 2**30:.1f} GiB")


def test_a_row_that_runs_out_of_memory_is_skipped_not_fatal(monkeypatch):
  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68.72GiB.")
  monkeypatch.setattr(kv_decode, "bench_kv_decode", out_of_memory)
  config = model_config.get_config("runlocal").kv_decode
  config.model = "tiny"
  config.workloads = ("128x2:dense",)
  (row,) = kv_decode.run_kv_decode(config, bandwidth=1e9)
  assert row["note"] == ("skipped: out of memory when run (RESOURCE_EXHAUSTED:"
                         " Out of memory while trying to allocate 68.72GiB.)")
  assert (row["context"], row["batch"], row["kv"]) == (128, 2, "dense")
  # any other error is a bug, and stops the suite
  monkeypatch.setattr(kv_decode, "bench_kv_decode",
                      lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    kv_decode.run_kv_decode(config, bandwidth=1e9)


def test_engine_rows_carry_their_speed_up_over_each_transformers_peer():
  ours = {"policy": "full", "ttft_s": 0.5, "decode_ms_step": 10.0}
  peers = [{"cache": "dynamic", "policy": "full (DynamicCache, eager)",
            "ttft_s": 0.6, "decode_ms_step": 40.0},
           {"cache": "static", "policy": "full (StaticCache, torch.compile)",
            "ttft_s": 0.55, "decode_ms_step": 12.0},
           {"cache": "static", "note": "skipped: out of memory on this card"}]
  row = model_suite.with_ratios(ours, peers)
  assert row == {**ours, "ttft_x_dynamic": pytest.approx(1.2),
                 "decode_x_dynamic": pytest.approx(4.0),
                 "ttft_x_static": pytest.approx(1.1),
                 "decode_x_static": pytest.approx(1.2)}


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
