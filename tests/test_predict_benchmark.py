"""benchmarks/predict.py runs and prints its table (numbers are never asserted)."""

import subprocess
import sys

from helpers import REPO


def test_the_predict_benchmark_prints_every_part():
  proc = subprocess.run([sys.executable, "benchmarks/predict.py", "--count=6", "--batch_size=4",
                         "--size=96x80"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert "6 JPEGs 96x80, batch 4" in lines[0]
  rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
  assert set(rows) == {"decode", "transform", "model", "end"}
  shares = [float(rows[k][2].rstrip("%")) for k in ("decode", "transform", "model")]
  assert abs(sum(shares) - 100) <= 2 and all(float(rows[k][0]) > 0 for k in rows if k != "end")
