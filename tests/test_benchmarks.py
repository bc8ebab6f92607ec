"""benchmarks/train_throughput.py: it times the real train step and its numbers add up.

The default tests measure a tiny C-Tran in-process on conftest's 8 fake CPU devices; the
command line end to end (a subprocess, ~30-60 s on 2 cores) is marked slow. Timings are
never asserted, only their consistency.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "train_throughput.py")
PEAK = 0.001  # TFLOP/s per device: any positive value makes the MFU computable on CPU


def _load_script():
  spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tt = _load_script()


def tiny_config():
  c = coco.get_config("tiny")
  c.data.image_size = 32
  c.model.hidden, c.model.layers = 32, 1
  return c


def parse_table(text):
  lines = [line for line in text.splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert set(lines[1]) <= {"|", "-"}
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
          for line in lines[2:]]
  return header, rows


@pytest.fixture(scope="module")
def tiny_result():
  config = tiny_config()
  assert tt.combinations(config) == [("float32", "none")]
  result = tt.measure(config, dtype="float32", remat="none", batch_size=16, num_labels=6,
                      steps=3, warmup=1, tag="[test]")
  tt.add_rates([result], {"float32": PEAK})
  return result


def test_measure_is_consistent(tiny_result):
  r = tiny_result
  assert (r["devices"], r["image_size"], r["num_labels"], r["batch_size"]) == (8, 32, 6, 16)
  assert len(r["step_times_s"]) == 3 and all(t > 0 for t in r["step_times_s"])
  assert r["step_median_s"] == pytest.approx(float(np.median(r["step_times_s"])))
  assert r["images_per_s"] == pytest.approx(16 / r["step_median_s"])
  assert r["flops_source"] == "compiled"
  assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_device_compiled"])
  # Per-device count x 8 = the unpartitioned count, plus the parameter update that every
  # device repeats (replicated Adam: a few tens of FLOPs per parameter on 7 more devices).
  lowered, params = r["flops_global_lowered"], r["params"]
  assert 0.9 * lowered < r["flops_per_step"] < 1.1 * lowered + 7 * 50 * params
  assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_median_s"] / (PEAK * 8e12))
  assert r["mfu"] == pytest.approx(r["hfu"])  # remat none: model FLOPs = own FLOPs
  m = r["memory_analysis_bytes"]
  assert m["peak_estimate"] == (m["argument"] + m["output"] - m["alias"] + m["temp"]
                                + m["generated_code"])
  assert m["alias"] > 0  # the donated state's buffers are reused for the new state
  assert r["device_peak_bytes"] is None  # CPU has no allocator statistics
  assert np.isfinite(r["final_loss"]) and r["final_loss"] > 0


def test_table_columns_and_numbers_parse(tiny_result):
  header, rows = parse_table(tt.format_table([tiny_result]))
  assert header == list(tt.COLUMNS)
  (row,) = rows
  assert (row["dtype"], row["remat"], row["batch"]) == ("float32", "none", "16")
  for key in ("img/s", "step ms", "GFLOP/step", "TFLOP/s", "compile s", "XLA peak MB"):
    assert float(row[key].replace(",", "")) > 0, key
  assert float(row["img/s"].replace(",", "")) == pytest.approx(
      tiny_result["images_per_s"], rel=0.01)
  assert row["MFU"].endswith("%")
  assert float(row["MFU"][:-1]) == pytest.approx(tiny_result["mfu"] * 100, rel=0.01)
  assert row["dev peak MB"] == "n/a"


def test_mfu_of_a_remat_row_uses_the_none_rows_flops():
  base = dict(batch_size=8, devices=2, step_median_s=0.5)
  rows = [dict(base, dtype="bfloat16", remat="none", flops_per_step=4e12),
          dict(base, dtype="bfloat16", remat="all", flops_per_step=5e12, step_median_s=1.0),
          dict(base, dtype="float32", remat="all", flops_per_step=5e12)]
  tt.add_rates(rows, {"bfloat16": 10.0, "float32": None})
  assert rows[0]["mfu"] == pytest.approx(4e12 / 0.5 / 20e12)
  assert rows[1]["mfu"] == pytest.approx(4e12 / 1.0 / 20e12)
  assert rows[1]["hfu"] == pytest.approx(5e12 / 1.0 / 20e12)
  assert rows[1]["images_per_s"] == pytest.approx(8.0)
  assert rows[2]["mfu"] is None and rows[2]["achieved_tflops"] == pytest.approx(10.0)


def test_out_of_memory_row_keeps_what_was_measured():
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                   "allocate 123 bytes.\nmore detail")
  assert tt._out_of_memory(oom) == ("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                    "allocate 123 bytes.")
  assert tt._out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: boom")) is None
  row = dict.fromkeys(tt.RESULT_KEYS)
  row.update(dtype="float32", remat="none", batch_size=64, devices=1, step_times_s=[],
             compile_s=12.5, flops_per_step=3e13, flops_source="compiled",
             memory_analysis_bytes={"argument": 2**20, "output": 2**20, "alias": 2**20,
                                    "temp": 5 * 2**20, "generated_code": 0,
                                    "peak_estimate": 6 * 2**20},
             error="out of memory while running: RESOURCE_EXHAUSTED")
  tt.add_rates([row], {"float32": 100.0})
  _, (cells,) = parse_table(tt.format_table([row]))
  assert (cells["img/s"], cells["step ms"], cells["MFU"]) == ("OOM", "n/a", "n/a")
  assert (cells["GFLOP/step"], cells["compile s"], cells["temp MB"]) == ("30,000.0", "12.5", "5")
  assert cells["XLA peak MB"] == "6"


def test_flops_of_counts_a_matmul_per_device():
  """2*M*N*K for one dot; compiled: divided by the 8 devices that split M."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jnp.ones((64, 32)), jax.NamedSharding(mesh, jax.P("data")))
  w = jax.device_put(jnp.ones((32, 16)), jax.NamedSharding(mesh, jax.P()))
  lowered = jax.jit(lambda w, x: x @ w).lower(w, x)
  assert tt.flops_of(lowered.cost_analysis()) == 2 * 64 * 32 * 16
  assert tt.flops_of(lowered.compile().cost_analysis()) == 2 * 64 * 32 * 16 / 8
  assert tt.flops_of([{"flops": 6.0}]) == 6.0
  assert tt.flops_of({"flops": -1.0}) is None and tt.flops_of(None) is None


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", ("H100 SXM", 989.5)),
    ("NVIDIA H100 80GB HBM3", "float32", ("H100 SXM", 494.5)),
    ("NVIDIA H100 PCIe", "bfloat16", ("H100 PCIe", 756.5)),
    ("NVIDIA H200", "bfloat16", ("H200 SXM", 989.5)),
    ("NVIDIA A100-SXM4-40GB", "float32", ("A100", 156.0)),
    ("NVIDIA L4", "bfloat16", ("L4", 121.0)),
    ("NVIDIA L40S", "bfloat16", (None, None)),
    ("TPU v4", "bfloat16", ("TPU v4", 275.0)),
    ("TPU v5 lite", "float32", ("TPU v5e", 197.0)),
    ("TPU v5", "bfloat16", ("TPU v5p", 459.0)),
    ("TPU v6 lite", "bfloat16", ("TPU v6e", 918.0)),
    ("cpu", "float32", (None, None)),
])
def test_peak_table(kind, dtype, expected):
  assert tt.peak_tflops(kind, dtype) == expected


def test_full_float32_precision_uses_the_fp32_peak():
  assert tt.peak_tflops("NVIDIA H100 80GB HBM3", "float32", "highest") == ("H100 SXM", 67.0)
  assert tt.peak_tflops("TPU v4", "float32", "highest") == ("TPU v4", None)


def test_bad_combinations_are_clear_errors():
  config = tiny_config()
  with pytest.raises(ValueError, match="--dtypes has 'float16'"):
    tt.combinations(config, "float32,float16")
  with pytest.raises(ValueError, match="--remat has 'some'"):
    tt.combinations(config, "", "some")
  assert tt.combinations(config, "float32,bfloat16", "none,all") == [
      ("float32", "none"), ("float32", "all"), ("bfloat16", "none"), ("bfloat16", "all")]


@pytest.mark.slow
def test_command_line(tmp_path):
  path = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--config=configs/coco.py:tiny", "--config.data.image_size=32",
       "--config.model.hidden=32", "--config.model.layers=1", "--batch_size=16",
       "--num_labels=6", "--steps=2", "--warmup=1", f"--peak_tflops={PEAK}",
       f"--json={path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  header, rows = parse_table(proc.stdout)
  assert header == list(tt.COLUMNS) and len(rows) == 1
  report = json.loads(path.read_text())
  assert report["device_count"] == 8 and report["peak_source"] == "--peak_tflops"
  (r,) = report["results"]
  assert float(rows[0]["img/s"].replace(",", "")) == pytest.approx(r["images_per_s"], rel=0.01)
  assert ("has no 'remat'" in proc.stdout) == ("remat" not in tiny_config().model)

  bad = subprocess.run([sys.executable, SCRIPT, "--config=configs/coco.py:tiny",
                        "--dtypes=float16"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2
  assert "--dtypes has 'float16'" in bad.stderr and "Traceback" not in bad.stderr
