"""The RULER-style family: its prompts, its scoring, and the task end to end."""

from __future__ import annotations

import collections
import json
import pathlib
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from conftest import ByteTokenizer, tiny_config, tiny_weights
from experiments import run as run_lib
from experiments.context import RunContext
from experiments.errors import InputError
from experiments.tasks import ruler as ruler_task
from experiments.tasks.retrieval import answer
from lmcache_jax.data import ruler
from lmcache_jax.data.ruler import aggregation, niah, tracking
from lmcache_jax.models import LoadedModel
from lmcache_jax.models.llama import from_weights
from policies.registry import EVICTION


TOK = ByteTokenizer()
# A play-like text of 512 made-up words (no digit, no hyphen, no capital).
WORDS = [a + b + c + d for a in ("bal", "cor", "dim", "fen", "gol", "har",
                                 "lum", "mor")
         for b in "aeio" for c in ("nt", "sk", "rd", "ll") for d in "uvwy"]
TEXT = "".join(" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(9))
               + ".\n" for i in range(600))
SHORT = 900        # tokens: every task but cwe fits
CWE_LENGTH = 2200  # bytes of cwe's one-shot example and ten words six times


def text_of(ids) -> str:
  return TOK.decode(ids)


def length_for(task: str) -> int:
  return CWE_LENGTH if task == "cwe" else SHORT


@pytest.mark.parametrize("task", ruler.TASKS)
def test_generation_is_reproducible_from_its_seed(task):
  length = length_for(task)
  first = ruler.generate(task, TOK, TEXT, length, seed=5)
  assert ruler.generate(task, TOK, TEXT, length, seed=5) == first
  other = ruler.generate(task, TOK, TEXT, length, seed=6)
  assert other.answers != first.answers


@pytest.mark.parametrize("task", [t for t in ruler.TASKS
                                  if t.startswith("niah") or t == "vt"])
def test_haystack_tasks_fill_the_length_exactly(task):
  for length in (SHORT, 1500):
    assert ruler.generate(task, TOK, TEXT, length, seed=1).num_tokens == length


@pytest.mark.parametrize("task", ["cwe", "fwe"])
def test_word_lists_fill_the_length_within_one_word(task):
  sample = ruler.generate(task, TOK, TEXT, 3000, seed=1)
  # one more listed word ("1234. word", at most 16 bytes) would not fit
  assert 3000 - 16 <= sample.num_tokens <= 3000


@pytest.mark.parametrize("task", list(niah.TASKS))
def test_each_needle_value_is_in_the_haystack_once(task):
  spec = niah.TASKS[task]
  sample = ruler.generate(task, TOK, TEXT, SHORT, seed=3)
  context = text_of(sample.context)
  question = text_of(sample.question)
  assert len(sample.answers) == spec.values * spec.queries
  for value in sample.answers:
    assert context.count(value) == 1
    assert value not in question + text_of(sample.answer_prefix)
  if spec.kind == "numbers":
    assert all(re.fullmatch(r"\d{7}", v) for v in sample.answers)
  elif spec.kind == "uuids":
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-"
                            r"[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
               for v in sample.answers)
  needles = re.findall(rf"One of the special magic {spec.kind} for (\S+) is: "
                       rf"(\S+)\.\n", context)
  assert len(needles) == spec.keys * spec.values
  asked = [key for key, _ in needles
           if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", question)]
  assert len(set(asked)) == spec.queries
  assert sorted(v for k, v in needles if k in asked) == sorted(sample.answers)
  for start in sample.fact_starts:   # each needle opens a line of its own
    assert text_of(sample.context[start:]).startswith("One of the special")
    assert text_of(sample.context[:start]).endswith("\n")


def test_variable_tracking_chain_is_in_the_haystack_in_order():
  sample = ruler.generate("vt", TOK, TEXT, SHORT, seed=4)
  context = text_of(sample.context)
  names = sample.answers
  assert len(names) == tracking.HOPS + 1
  value = re.search(r"assigned the value (\d{5}) in", text_of(
      sample.question)).group(1)
  assert context.count(value) == 1
  lines = [text_of(sample.context[s:]).split("\n")[0]
           for s in sample.fact_starts]
  assert lines == [f"VAR {names[0]} = {value}"] + [
      f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))]
  counts = [context.count(name) for name in names]
  assert counts == [2, 2, 2, 2, 1]   # the last is assigned, never read
  assert "5 variables are assigned the value " + value in text_of(
      sample.answer_prefix)


def listed_words(sample) -> list[str]:
  """The words of the prompt's own numbered list (after the one-shot
  example, which ends with its answer and a newline)."""
  listing = text_of(sample.context).rsplit(aggregation.CWE_INSTRUCTION, 1)[1]
  return re.findall(r"\d+\. ([a-z]+)", listing)


@pytest.mark.parametrize("length, freq_common, freq_rare",
                         [(CWE_LENGTH, 6, 1), (9000, 30, 3)])
def test_common_words_occur_as_often_as_ruler_says(length, freq_common,
                                                   freq_rare):
  sample = ruler.generate("cwe", TOK, TEXT, length, seed=2)
  counts = collections.Counter(listed_words(sample))
  assert len(sample.answers) == aggregation.COMMON_WORDS
  assert all(counts[w] == freq_common for w in sample.answers)
  rare = set(counts) - set(sample.answers)
  assert rare and all(counts[w] == freq_rare for w in rare)
  numbers = re.findall(r"(\d+)\. [a-z]+", text_of(sample.context).rsplit(
      aggregation.CWE_INSTRUCTION, 1)[1])
  assert numbers == [str(i + 1) for i in range(sum(counts.values()))]
  # the one-shot example uses none of the answer words
  example = text_of(sample.context).rsplit(aggregation.CWE_INSTRUCTION, 1)[0]
  assert not set(re.findall(r"[a-z]+", example)) & set(sample.answers)


def test_common_words_are_kept_apart_from_words_that_hold_them():
  words = ["bell", "bells", "race", "embrace", "fetch", "cost", "costly"]
  assert aggregation.apart(words, 2) == (["bell", "race"],
                                         ["fetch", "cost", "costly"])
  assert aggregation.apart(words, 3) == (["bell", "race", "fetch"],
                                         ["cost", "costly"])


def test_frequent_words_follow_zipf_with_the_answers_ranked_two_to_four():
  sample = ruler.generate("fwe", TOK, TEXT, 3000, seed=2)
  coded = text_of(sample.context)[len(aggregation.FWE_INSTRUCTION):].split()
  counts = collections.Counter(coded)
  assert counts.most_common(1)[0][0] == aggregation.NOISE
  top = [w for w, _ in counts.most_common(4)[1:]]
  assert sorted(top) == sorted(sample.answers)
  others = [c for w, c in counts.items()
            if w not in sample.answers and w != aggregation.NOISE]
  assert min(counts[w] for w in sample.answers) > max(others)
  ranked = [counts[w] for w in sample.answers]   # the answers in rank order
  assert ranked == sorted(ranked, reverse=True)


def test_bad_requests_name_the_problem():
  with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
    ruler.generate("niah", TOK, TEXT, SHORT, seed=0)
  with pytest.raises(ValueError, match="'niah_multiquery'.*at least"):
    ruler.generate("niah_multiquery", TOK, TEXT, 300, seed=0)
  with pytest.raises(ValueError, match="'cwe'.*too short"):
    ruler.generate("cwe", TOK, TEXT, SHORT, seed=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    ruler.generate("vt", TOK, TEXT, SHORT, seed=0).split("agnostic")


def test_the_two_modes_split_the_prompt_around_the_question():
  sample = ruler.generate("niah_single_word", TOK, TEXT, SHORT, seed=0)
  agnostic = sample.split("query_agnostic")
  aware = sample.split("query_aware")
  assert agnostic.prompt == sample.context
  assert agnostic.cue == sample.question + sample.answer_prefix
  assert aware.prompt == sample.context + sample.question
  assert aware.cue == sample.answer_prefix
  assert agnostic.num_tokens == aware.num_tokens == SHORT


@pytest.mark.parametrize("prediction, answers, share", [
    (" 1234567 and 7654321.", ("1234567", "7654321"), 1.0),
    (" 1234567, then nothing", ("1234567", "7654321"), 0.5),
    (" nothing", ("1234567",), 0.0),
    ("ABCDE, FGHIJ", ("abcde", "FGHIJ", "KLMNO", "PQRST"), 0.5),   # case
    (" 12345678", ("1234567",), 1.0),   # a substring counts, as in RULER
])
def test_match_all_is_rulers_share_of_answers_found(prediction, answers,
                                                    share):
  assert ruler.match_all(prediction, answers) == share


def test_cell_counts_a_prompt_solved_only_when_every_answer_is_found():
  figures = ruler.cell(["a b", "a", "", "c"], [("a", "b"), ("a", "b"),
                                               ("a",), ("c",)])
  assert figures["solved"] == 2 and figures["prompts"] == 4
  assert figures["accuracy"] == 0.5
  assert figures["score"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
  assert (figures["low"], figures["high"]) == ruler.wilson_interval(2, 4)
  with pytest.raises(ValueError, match="one prediction per prompt"):
    ruler.cell(["a"], [("a",), ("b",)])


@pytest.mark.parametrize("successes, trials, low, high", [
    # Newcombe (1998), Table I, and the closed form at 0 and n
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (8, 10, 0.4902, 0.9433),
    (50, 50, 0.9287, 1.0), (1, 3, 0.0615, 0.7923)])
def test_wilson_interval_matches_known_values(successes, trials, low, high):
  got = ruler.wilson_interval(successes, trials)
  assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
  with pytest.raises(ValueError, match="trials must be >= 1"):
    ruler.wilson_interval(0, 0)
  with pytest.raises(ValueError, match=r"successes must be in \[0, 4\]"):
    ruler.wilson_interval(5, 4)


@pytest.fixture(scope="module")
def byte_lm():
  cfg = tiny_config(vocab_size=256, max_context=4096, head_dim=32)
  model = from_weights(cfg, tiny_weights(cfg), jnp.float32)
  return LoadedModel.from_module(model, TOK, "tiny-bytes")


def oracle_answers(lm, policy, samples, mode) -> list[str]:
  """What a perfect reader of the compressed cache answers: every needle
  value whose whole line survived the compression (layer 0, head 0)."""
  ctx = RunContext(config=ml_collections.ConfigDict(), lm=lm,
                   policy=policy.bind(lm.cfg))
  splits = [s.split(mode) for s in samples]
  _, cache, _ = answer(ctx, splits, max_new_tokens=1, chunk=64,
                       mode="prefill")
  readings = []
  for row, split in zip(np.asarray(cache.positions)[0, :, 0], splits):
    kept = sorted(p for p in row if 0 <= p < len(split.prompt))
    text = text_of([split.prompt[p] for p in kept])
    readings.append(" ".join(re.findall(r"\n.* is: (\S+)\.\n", text)))
  return readings


@pytest.mark.parametrize("mode", ruler.MODES)
def test_oracle_scores_all_when_the_needle_is_kept_and_none_when_dropped(
    byte_lm, mode):
  samples = [ruler.generate("niah_single_number", TOK, TEXT, SHORT, seed=s)
             for s in range(3)]
  window = 64
  for sample in samples:   # the needle lies wholly before the window
    end = sample.fact_starts[0] + len(TOK.encode(niah.NEEDLE.format(
        kind="numbers", key="k", value=sample.answers[0])))
    assert end < len(sample.split(mode).prompt) - window
  answers = [s.answers for s in samples]
  full = oracle_answers(byte_lm, EVICTION.make("full"), samples, mode)
  assert ruler.cell(full, answers)["accuracy"] == 1.0
  recent = EVICTION.make("sliding_window", budget=window)
  dropped = oracle_answers(byte_lm, recent, samples, mode)
  assert ruler.cell(dropped, answers)["accuracy"] == 0.0


def ruler_config(tmp_path: pathlib.Path, **fields) -> ml_collections.ConfigDict:
  text_file = tmp_path / "text.txt"
  text_file.write_text(TEXT)
  config = default.get_config("runlocal")
  config.task = "ruler"
  config.model = "tiny-bytes"
  config.dtype = "float32"
  config.text_file = str(text_file)
  config.output_dir = str(tmp_path / "runs")
  config.ruler.prompts = 2
  config.ruler.max_new_tokens = 3
  for key, value in fields.items():
    config.ruler[key] = value
  return config


def test_cli_run_scores_every_task_with_an_interval(tmp_path, byte_lm,
                                                    capsys):
  config = ruler_config(tmp_path, lengths=(CWE_LENGTH,))
  results = run_lib.run(config, lm=byte_lm)
  assert set(results["tasks"]) == set(ruler.TASKS)
  assert len(results["cells"]) == len(ruler.TASKS)
  for cell in results["cells"]:
    assert cell["prompts"] == 2 and len(cell["samples"]) == 2
    assert cell["solved"] == sum(
        ruler.match_all(s["output"], s["answers"]) == 1.0
        for s in cell["samples"])
    assert (cell["low"], cell["high"]) == pytest.approx(
        ruler.wilson_interval(cell["solved"], 2))
  assert results["budget_tokens"] is None   # the full cache
  table = capsys.readouterr().out
  assert all(task in table for task in ruler.TASKS)
  path = run_lib.write_results(config, results)
  assert json.loads((path / "results.json").read_text())["tasks"].keys() == (
      results["tasks"].keys())


@pytest.mark.parametrize("mode", ruler.MODES)
def test_compression_ratio_is_a_share_of_what_each_mode_compresses(
    tmp_path, byte_lm, mode):
  config = ruler_config(tmp_path, compression=0.75, mode=mode)
  config.policy.name = "snapkv(window=8)"
  ctx = RunContext(config=config, lm=byte_lm, policy=EVICTION.make("full"))
  sample = ruler.generate("niah_single_number", TOK, TEXT, SHORT, seed=0)
  compressed = len(sample.split(mode).prompt)
  policy = ruler_task.cell_policy(ctx, compressed)
  assert policy.budget == round(0.25 * compressed) and policy.window == 8
  config.ruler.compression = 0.0
  config.policy.budget = 0.5   # a fractional budget is the share kept
  assert ruler_task.cell_policy(ctx, compressed).budget == round(
      0.5 * compressed)


def test_a_compressed_run_resolves_the_ratio_in_each_cell(tmp_path, byte_lm):
  config = ruler_config(tmp_path, tasks="niah_single_number,fwe",
                        lengths=(SHORT,), compression=0.75,
                        mode="query_aware")
  config.policy.name = "snapkv"
  results = run_lib.run(config, lm=byte_lm)
  for cell in results["cells"]:
    task = cell["task"]
    samples = [ruler.generate(task, TOK, TEXT, SHORT, ruler_task.prompt_seed(
        0, task, SHORT, i)) for i in range(2)]
    assert [s.answers for s in samples] == [
        tuple(s["answers"]) for s in cell["samples"]]
    compressed = max(len(s.split("query_aware").prompt) for s in samples)
    assert cell["budget_tokens"] == round(0.25 * compressed)
  assert results["budget_tokens"] is None   # fwe's prompts are shorter


@pytest.mark.parametrize("fields, policy, match", [
    (dict(compression=0.5), "full", "needs a policy with a budget"),
    (dict(compression=1.0), "snapkv", r"share of the context dropped"),
    (dict(mode="aware"), "full", "mode must be one of"),
    (dict(tasks="niah,vt"), "full", r"unknown task\(s\) \['niah'\]"),
    (dict(lengths=(8000,)), "full", "more than the model has positions"),
    (dict(lengths=(SHORT,), tasks="cwe"), "full", "'cwe'.*too short"),
])
def test_bad_ruler_configs_are_input_errors(tmp_path, byte_lm, fields, policy,
                                            match):
  config = ruler_config(tmp_path, **fields)
  config.policy.name = policy
  with pytest.raises(InputError, match=match):
    run_lib.run(config, lm=byte_lm)


def test_compression_and_a_budget_are_two_budgets(tmp_path, byte_lm):
  config = ruler_config(tmp_path, compression=0.5, lengths=(SHORT,))
  config.policy.name = "snapkv(budget=64)"
  with pytest.raises(InputError, match="two budgets"):
    run_lib.run(config, lm=byte_lm)
