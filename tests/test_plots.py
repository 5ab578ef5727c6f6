"""The standard sweep plots: what they draw, their labels, and when they skip."""

from __future__ import annotations

import numpy as np

from experiments import plots


def record(policy, budget, ppl, kv_bytes, **extra):
  return {"task": "perplexity", "policy": policy, "budget": budget,
          "kv_bits": 16.0, "calibration": "", "context": 2048, "ppl": ppl,
          "kv_bytes": kv_bytes, **extra}


def test_pareto_front_hand_worked():
  points = [(1, 30.0), (2, 20.0), (2, 25.0), (3, 22.0), (4, 10.0), (5, 10.0)]
  assert plots.pareto_front(points, higher_is_better=False) == [
      (1, 30.0), (2, 20.0), (4, 10.0)]
  accuracy = [(1, 0.2), (2, 0.1), (3, 0.9), (4, 0.9)]
  assert plots.pareto_front(accuracy, higher_is_better=True) == [(1, 0.2), (3, 0.9)]


def test_quality_vs_memory_has_series_per_policy_and_front():
  records = [record("full", 0.0, 20.0, 8 << 20),
             record("h2o", 128.0, 26.0, 1 << 20), record("h2o", 256.0, 23.0, 2 << 20),
             record("attention_sink", 128.0, 24.0, 1 << 20)]
  fig = plots.quality_vs_memory(records, "ppl")
  ax = fig.axes[0]
  assert ax.get_xlabel() == "KV cache payload (MiB)" and "perplexity" in ax.get_ylabel()
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == ["full", "attention_sink", "h2o", "Pareto front"]
  front = ax.get_lines()[-1]
  np.testing.assert_allclose(front.get_xdata(), [1, 2, 8])
  np.testing.assert_allclose(front.get_ydata(), [24, 23, 20])
  assert plots.quality_vs_memory(records, "accuracy") is None


def test_ppl_by_position_panel_per_budget_with_full_reference():
  curve = lambda base: [{"start": 0, "end": 512, "ppl": base},  # noqa: E731
                        {"start": 512, "end": 1024, "ppl": base + 1}]
  records = [record("full", 0.0, 20.0, 8, ppl_by_position=curve(20)),
             record("h2o", 128.0, 26.0, 1, ppl_by_position=curve(25)),
             record("h2o", 256.0, 23.0, 2, ppl_by_position=curve(22))]
  fig = plots.ppl_by_position(records)
  assert [ax.get_title() for ax in fig.axes] == ["budget 128 tokens", "budget 256 tokens"]
  for ax in fig.axes:
    assert ax.get_xlabel() == "token position in the stream"
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["full", "h2o"]
  np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_xdata(), [256, 768])


def test_heatmap_averages_by_depth_and_length():
  def retrieval(policy, context, hits):
    return {"task": "passkey", "policy": policy, "budget": 256.0,
            "kv_bits": 16.0, "context": context, "accuracy": float(np.mean(hits)),
            "kv_bytes": 1,
            "samples": [{"depth": d, "correct": h} for d, h in zip((0.0, 0.5, 0.5), hits)]}
  records = [retrieval("snapkv", 1024, [1, 1, 0]), retrieval("snapkv", 2048, [0, 1, 1])]
  records.append({**retrieval("full", 1024, [1, 1, 1]), "budget": 0.0})
  fig = plots.accuracy_heatmap(records)
  ax = fig.axes[0]
  grid = ax.get_images()[0].get_array()
  # Columns (length, depth): (1024, 0%), (1024, 50%), (2048, 0%), (2048, 50%).
  np.testing.assert_allclose(grid.filled(np.nan), [[1, 1, np.nan, np.nan],
                                                   [1, 0.5, 0, 1]])
  assert [t.get_text() for t in ax.get_yticklabels()] == [
      "passkey: full", "passkey: snapkv@256"]
  assert "depth" in ax.get_xlabel() and "length" in ax.get_xlabel()
  assert plots.accuracy_heatmap([record("full", 0.0, 1.0, 1)]) is None


def test_ttft_reads_seconds_or_milliseconds(tmp_path):
  records = [{"task": "reuse", "policy": "full", "budget": 0.0, "kv_bits": 16.0,
              "context": 2048, "ttft_cold_s": 2.0, "ttft_warm_s": 0.25},
             {"task": "multiturn", "policy": "full", "budget": 0.0, "kv_bits": 4.0,
              "calibration": "uniform", "context": 2048, "ttft_cold_ms": 900.0,
              "ttft_warm_ms": 300.0}]
  fig = plots.ttft_cold_warm(records)
  ax = fig.axes[0]
  assert ax.get_xlabel() == "time to first token (ms)"
  widths = sorted(p.get_width() for p in ax.patches)
  np.testing.assert_allclose(widths, [250, 300, 900, 2000])
  written = plots.standard_plots(records, tmp_path)
  assert [p.name for p in written] == ["ttft_cold_warm.png"]


def test_ppl_by_position_quantized_cells_are_not_the_reference():
  curve = [{"start": 0, "end": 100, "ppl": 10.0}]
  records = [record("full", 0.0, 10.0, 8, ppl_by_position=curve),
             {**record("full", 0.0, 11.0, 2, ppl_by_position=curve),
              "kv_bits": 4.0, "calibration": "uniform"}]
  fig = plots.ppl_by_position(records)
  assert [ax.get_title() for ax in fig.axes] == ["no eviction"]
  lines = fig.axes[0].get_lines()
  assert [line.get_linestyle() for line in lines] == ["--", "-"]
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [
      "full", "full 4-bit uniform"]


def test_plan_heatmap_draws_every_head_of_every_plan(tmp_path):
  mixed = (("int4", "int3", "int3"), ("int2", "int3", "int4"))
  fig = plots.plan_heatmap({"uniform": (("int3",) * 3,) * 2, "mixed": mixed})
  panels = [ax for ax in fig.axes if ax.get_title()]
  assert [ax.get_title().split("\n")[0] for ax in panels] == ["uniform", "mixed"]
  drawn = panels[1].images[0].get_array()
  np.testing.assert_array_equal(drawn, [[4, 3, 3], [2, 3, 4]])
  assert [t.get_text() for t in panels[1].texts] == ["4", "3", "3", "2", "3", "4"]
  assert panels[1].get_title().endswith("avg 3.17 bits")
  fig.savefig(tmp_path / "plan.png")
