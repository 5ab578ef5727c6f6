"""Every command in README.md works as written.

Each ``python -m experiments.run`` command is checked with ``--dry_run``
(everything that needs no weights, the model left unloaded); the cheapest
run for real on the real model, shrunk by flags appended to them (the last
value of a flag wins); sweeps rebuild their report; the Python block runs.
Set ``LMCACHE_JAX_README_ALL=1`` to run every experiments.run command for
real (minutes).
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from lmcache_jax.data import shakespeare

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
# Flags that shrink a command to seconds, by what it runs.
SHRINK = {
    "": ["--context=256"],
    "generate": ["--max_new_tokens=8"],
    "passkey": ["--config.passkey.lengths=(256,)", "--config.passkey.depths=(0.5,)"],
    "needle": ["--config.needle.lengths=(256,)", "--config.needle.depths=(0.5,)"],
    "reuse": ["--config.reuse.doc_tokens=256", "--config.reuse.repeats=1",
              "--config.reuse.max_new_tokens=2", "--config.reuse.questions=('Who?',)"],
    "multiturn": ["--config.multiturn.context_tokens=256",
                  "--config.multiturn.repeats=1",
                  "--config.multiturn.max_new_tokens=2",
                  "--config.multiturn.messages=('Who?','Why?')"],
    "calibrate": ["--config.quant.calibration_tokens=128"],
    "ruler": ["--config.ruler.tasks=niah_single_number,vt",
              "--config.ruler.prompts=1", "--config.ruler.max_new_tokens=4"],
}
# Run for real in every test run (the rest are dry runs unless
# LMCACHE_JAX_README_ALL=1): under a minute each.
CHEAP = ("python -m experiments.run",
         'python -m experiments.run --task=generate --prompt="Name three planets."')


def blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[str]:
  """The shell commands of the README: continuation lines joined, comments
  dropped, each ``&&`` part on its own."""
  found = []
  for block in blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      found += [part.strip() for part in line.split("&&") if part.strip()]
  return found


def run_commands() -> list[str]:
  return [c for c in commands() if c.startswith("python -m experiments.run")]


def shrink(args: list[str]) -> list[str]:
  task = next((a.split("=", 1)[1] for a in args if a.startswith("--task=")), "")
  return args + SHRINK[""] + SHRINK.get(task, [])


def run(args: list[str], tmp_path, timeout=600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  my_text = tmp_path / "my.txt"  # the README's example of a text file
  if not my_text.exists():
    my_text.write_text(shakespeare.load_text("macbeth"))
  args = [a.replace("runs/", f"{tmp_path}/").replace("=my.txt", f"={my_text}")
          for a in args]
  return subprocess.run([sys.executable, *args[1:],
                         f"--output_dir={tmp_path}/runs"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_readme_opens_with_install_and_tests():
  first = commands()[:5]
  assert first[:3] == ["python3 -m venv .venv", ". .venv/bin/activate",
                       "pip install -e '.[dev]'"]
  assert first[3:] == ["python -m experiments.run", "python -m pytest"]
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python -m experiments.run" in ci and "python -m pytest" in ci


def test_every_command_is_known():
  known = ("python3 -m venv", ". .venv/bin/activate", "pip install",
           "python -m pytest", "python -m experiments.run",
           "python -m experiments.sweep", "python -m experiments.policy_table",
           "python -m experiments.bench")
  unknown = [c for c in commands() if not c.startswith(known)]
  assert not unknown, f"README commands this test does not check: {unknown}"


@pytest.mark.parametrize("command", run_commands())
def test_run_command_checks(command, tmp_path):
  (tmp_path / "plan-3bit").mkdir()  # what the calibrate command would save
  out = run(shlex.split(command) + ["--dry_run"], tmp_path, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.real_model
@pytest.mark.parametrize("command", run_commands())
def test_run_command_runs(command, tmp_path):
  if command not in CHEAP and not os.environ.get("LMCACHE_JAX_README_ALL"):
    pytest.skip("set LMCACHE_JAX_README_ALL=1 to run every command")
  if "--quant_plan=" in command:  # the plan the calibrate command saves
    plan = run(shrink(shlex.split(
        "python -m experiments.run --task=calibrate --kv_bits=3 "
        "--config.quant.save_plan=runs/plan-3bit")), tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
  out = run(shrink(shlex.split(command)), tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "results:" in out.stdout


@pytest.mark.parametrize("command", [
    c for c in commands() if c.startswith(("python -m experiments.sweep",
                                           "python -m experiments.policy_table",
                                           "python -m experiments.bench"))])
def test_other_commands(command, tmp_path):
  args = shlex.split(command)
  if args[2] == "experiments.bench" and "--suite=list" not in args:
    pytest.skip("benchmark suites run on a GPU")
  if args[2] != "experiments.bench":
    args.append("--report_only")  # builds the grid, runs no cell
  out = run(args, tmp_path, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.real_model
def test_python_block(tmp_path):
  """It runs, and the store serves the second prompt what its comment says:
  (reused, prompt) tokens of each answer as the README states them."""
  code = blocks("python")[0]
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                       env=dict(os.environ, JAX_PLATFORMS="cpu",
                                PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  printed = re.findall(r"^(\d+) of (\d+) prompt tokens from the store:",
                       out.stdout, re.M)
  stated = re.search(r"# (\d+) of (\d+) prompt tokens from the store, then "
                     r"(\d+) of (\d+):", code).groups()
  assert printed == [stated[:2], stated[2:]]
  assert stated == ("0", "548", "512", "551")
