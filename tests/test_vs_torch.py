"""benchmarks/vs_torch.py end to end on a tiny model, so that the script cannot rot.

Our side (the trainer's real `train.jit_train_step` and the evaluator's step, in a
subprocess) runs by default; the stand-in side needs a python with torch and torchvision
(``CTRAN_TORCH_PYTHON``, else /work/torchvenv/bin/python when present) and the stand-in
script beside the checkout, and is marked slow (it builds a ResNet-101). Timings are never
asserted, only that they are there and the table agrees with the JSON.
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "vs_torch.py")
STAND_IN = os.path.join(os.path.dirname(REPO), "shared", "bench", "torch_ctran_step.py")
# The subprocesses see one CPU device, as a user would: not conftest's eight fake ones.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def torch_python():
  """A python that imports torch and torchvision, or None."""
  candidates = [os.environ.get("CTRAN_TORCH_PYTHON"), "/work/torchvenv/bin/python",
                sys.executable]
  for python in filter(None, candidates):
    if os.path.exists(python) and subprocess.run(
        [python, "-c", "import torch, torchvision"], capture_output=True).returncode == 0:
      return python
  return None


def run_script(tmp_path, *extra):
  out = tmp_path / "vs.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--model", "tiny", "--shapes", "32x2", "--rounds", "1",
       "--warmup", "1", "--steps", "2", "--num-labels", "6", "--json", str(out),
       "--log", str(tmp_path / "log.txt"), *extra],
      cwd=REPO, env={**ENV, "PYTHONPATH": REPO}, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "log.txt").read_text()
  with open(out) as f:
    return proc.stdout, json.load(f)


def table_rows(stdout):
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
          for line in lines[2:]]


def check_ours(run, size=32, batch=2):
  assert run["side"] == "ours" and run["model"] == "tiny"
  assert (run["size"], run["batch"]) == (size, batch)
  assert len(run["train_times_s"]) == 2 and len(run["eval_times_s"]) == 2
  assert all(t > 0 for t in run["train_times_s"] + run["eval_times_s"])
  assert run["train_step_s"] == pytest.approx(statistics.median(run["train_times_s"]))
  assert run["compile_s"] == pytest.approx(run["train_compile_s"] + run["eval_compile_s"])
  assert run["peak_rss_mb"] > 100  # ru_maxrss of the child, not of this process: jax alone
  # the state was donated: the compiled step aliases its input buffers
  assert run["xla_memory_bytes"]["alias"] > 0


def test_ours_end_to_end(tmp_path):
  stdout, data = run_script(tmp_path)
  runs = data["results"]["32^2 b2"]
  assert list(runs) == ["ours"] and len(runs["ours"]) == 1
  check_ours(runs["ours"][0])
  (row,) = table_rows(stdout)
  assert (row["shape"], row["side"], row["rounds"]) == ("32^2 b2", "ours", "1")
  assert float(row["train step s"]) == pytest.approx(runs["ours"][0]["train_step_s"], abs=1e-3)
  assert row["train ratio"] == "n/a"  # no stand-in measured, no ratio invented


@pytest.mark.slow
def test_with_the_stand_in(tmp_path):
  python = torch_python()
  if python is None or not os.path.exists(STAND_IN):
    pytest.skip("no python with torch and torchvision, or no stand-in script")
  stdout, data = run_script(tmp_path, "--torch-python", python, "--torch-script", STAND_IN)
  runs = data["results"]["32^2 b2"]
  assert list(runs) == ["ours", "torch"]
  check_ours(runs["ours"][0])
  theirs = runs["torch"][0]
  assert theirs["side"] == "torch" and (theirs["size"], theirs["batch"]) == (32, 2)
  assert theirs["train_step_s"] > 0 and theirs["peak_rss_mb"] > 100
  rows = {row["side"]: row for row in table_rows(stdout)}
  assert rows["torch"]["train ratio"] == "1.00"
  ratio = runs["ours"][0]["train_step_s"] / theirs["train_step_s"]
  assert float(rows["ours"]["train ratio"]) == pytest.approx(ratio, abs=0.006)
