"""benchmarks/gpu_check.sh on CPU with GPU_CHECK_TINY=1: every section runs, the JSON and
the table are written, and nothing imports TensorFlow, TFDS, ml_collections or clu (the GPU
machine has none of them).

The default test runs env, parity (64^2 only) and train (tiny model, two rows); the torch
section needs a python with torch (``CTRAN_TORCH_PYTHON`` or /work/torchvenv/bin/python)
and builds a ResNet-101, so that test is marked slow. Timings are never asserted.
"""

import json
import os
import subprocess
import sys

import pytest
from test_vs_torch import ENV, STAND_IN, torch_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
FORBIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")


def run_check(tmp_path, sections, **env):
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=900,
      env={**ENV, "GPU_CHECK_TINY": "1", "GPU_CHECK_SECTIONS": sections,
           "OUT": str(out), "PYTHON": sys.executable, "TORCH_PYTHON": sys.executable,
           "PYTHONPATH": "", "LIMIT_ENV": "600", "LIMIT_PARITY": "900", "LIMIT_TRAIN": "900",
           **env})
  logs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted(out.glob("*.log")))
  assert proc.returncode == 0, proc.stdout + proc.stderr + logs
  with open(out / "gpu_check.json") as f:
    report = json.load(f)
  assert (out / "gpu_check.md").read_text().strip() in proc.stdout
  return report, proc.stdout, logs


def test_tiny_check_writes_the_report_without_tensorflow(tmp_path):
  report, stdout, logs = run_check(tmp_path, "env parity train")
  s = report["sections"]
  assert report["tiny"] is True
  for name in ("env", "parity", "train"):
    assert s[name]["status"] == "ok", (name, s[name], logs)
    assert s[name]["forbidden_imported"] == []
  assert report["forbidden_imported"] == []
  assert s["env"]["platform"] == "cpu"
  # parity at 64^2 only, every output within test_parity.py's tolerances
  assert s["parity"]["ok"] and s["parity"]["weights_fingerprint_ok"]
  assert {(r["size"], r["what"]) for r in s["parity"]["rows"]} == {
      (64, "features"), (64, "logits"), (64, "logits_allunk"), (64, "attention")}
  assert all(0 <= r["max_error"] < r["tolerance"] for r in s["parity"]["rows"])
  rows = s["train"]["rows"]
  assert [(r["dtype"], r["remat"]) for r in rows] == [("float32", "none"),
                                                      ("bfloat16", "encoder")]
  for r in rows:
    assert "error" not in r, r
    assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"])
    assert (r["batch"], r["image_size"]) == (2, 64)
  assert s["torch"]["status"] == "skipped"
  assert "torch: skipped" in stdout and "| ours | tiny-64-b8 b2 | bfloat16 | encoder |" in stdout


def test_the_blocker_catches_an_import(tmp_path):
  """Every section blocks the four packages: code that imports one fails the section."""
  code = ("import runpy, sys; sys.argv = ['gpu_check.py']; "
          "g = runpy.run_path('benchmarks/gpu_check.py'); "
          "import importlib\n"
          "for name in g['BLOCKED']:\n"
          "  try:\n"
          "    importlib.import_module(name)\n"
          "  except ImportError:\n"
          "    print('blocked', name)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split("\n")[:-1] == [f"blocked {name}" for name in FORBIDDEN]


@pytest.mark.slow
def test_tiny_check_with_the_stand_in(tmp_path):
  python = torch_python()
  if python is None or not os.path.exists(STAND_IN):
    pytest.skip("no python with torch and torchvision, or no stand-in script")
  report, stdout, logs = run_check(tmp_path, "env torch", TORCH_PYTHON=python,
                                   TORCH_SCRIPT=STAND_IN, LIMIT_TORCH="600")
  torch_section = report["sections"]["torch"]
  assert torch_section["status"] == "ok", logs
  assert torch_section["forbidden_imported"] == []
  assert [r["dtype"] for r in torch_section["rows"]] == ["float32", "bfloat16 autocast"]
  assert all(r["step_s"] > 0 and r["eval_s"] > 0 for r in torch_section["rows"])
  assert "| torch (cpu) | R101 64^2 b1 | bfloat16 autocast |" in stdout
