"""A real two-process run on one machine, against one process on the same four devices.

Two processes of `ctran_jax.main` (through tests/multihost_worker.py, which records what
they computed), 2 fake CPU devices each, joined by `jax.distributed` on 127.0.0.1, train
the tiny demo config on a (data=2, fsdp=2) mesh: each process reads its own half of every
batch and holds half of the large weights. In this pytest process, one process trains the
same config on 4 of conftest's 8 devices with pure data parallelism, its batches assembled
from the two processes' shards, so both runs see the same global batches. Checked: the
same losses and final parameters, the checkpoint of each run evaluates in the other
setting to the other run's metrics, and process 1 logs no INFO lines.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from helpers import demo_config

from ctran_jax import checkpoint, main, train
from ctran_jax.data import demo, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
NUM_LABELS = len(demo.LABEL_NAMES)
TIMEOUT_S = 300  # the whole two-process run; a hung coordinator fails the test
# test_train's tiny model with the ResNet stem alone as backbone (conv, BatchNorm, max-pool:
# each process compiles in seconds), trained with SGD so that parameters can be compared
# closely (Adam turns rounding-level gradient differences into ~1e-4 parameter differences).
OVERRIDES = {
    "data.name": "ctran_demo/tiny", "data.test_split": "",
    "data.image_size": 32, "data.scale_size": 36, "data.crop_sizes": (36, 32, 28),
    "model.backbone_width": 8, "model.backbone_stage_sizes": (0, 0, 0, 0),
    "model.hidden": 32, "model.layers": 1,
    "optimizer.name": "sgd", "optimizer.learning_rate": 0.05,
    "schedule.name": "constant", "schedule.warmup_steps": 0,
    "batch_size": 16, "num_train_steps": STEPS, "log_every_steps": 1,
    "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS,
    "eval.batch_size": 32, "eval.known_fractions": (0.0, 0.5),
    "mesh.fsdp_min_size": 512,
}
TWO_PROCESS_MESH = {"mesh.fsdp": 2}        # 2 processes x 2 devices: data=2 (hosts), fsdp=2
ONE_PROCESS_MESH = {"mesh.num_devices": 4}  # data=4, fsdp=1


def make_config(data_dir, overrides):
  return demo_config(**{**OVERRIDES, "data.data_dir": data_dir, **overrides})


def write_config_file(path, data_dir, overrides) -> str:
  """A config file for the command line equal to `make_config(data_dir, overrides)`."""
  return helpers.write_config_file(path, **{**OVERRIDES, "data.data_dir": data_dir,
                                            **overrides})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(tmp_path, flags: list[str], timeout_s: float = TIMEOUT_S):
  """tests/multihost_worker.py in 2 processes; (their records, their output), process 0 first.

  Fails the test, with both processes' output, when one exits with an error (the other is
  then killed) or when they are not done within `timeout_s` (e.g. a hung coordinator).
  """
  # Level-0 LLVM codegen halves the compile time that dominates these tiny runs; the
  # results match the default level's to ~1e-7 (measured).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0"}
  port, results = free_port(), str(tmp_path / "record")
  procs, output, timed_out = [], [], False
  try:
    for i in range(2):
      with open(tmp_path / f"process{i}.log", "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), *flags,
             f"--results={results}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}", "--initialization_timeout=60"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    # Stop at the first failure: the survivor would wait in a collective for minutes.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # SIGKILL: jax's preemption notifier catches SIGTERM
      p.wait()
  for i in range(2):
    output.append((tmp_path / f"process{i}.log").read_text())
  if timed_out or any(p.returncode for p in procs):
    note = f" (stopped after {timeout_s} s)" if timed_out else ""
    detail = "\n".join(f"--- process {i}: exit {p.returncode}{note}\n{output[i][-4000:]}"
                       for i, p in enumerate(procs))
    pytest.fail(f"the two-process run failed:\n{detail}")
  records = []
  for i in range(2):
    with open(f"{results}.{i}.json") as f:
      records.append(json.load(f))
  return records, output


def two_process_batches(real_train_dataset):
  """`pipeline.train_dataset` for one process that yields what 2 processes feed together."""
  def train_dataset(data_config, **kwargs):
    assert (kwargs.get("process_index", 0), kwargs.get("process_count", 1)) == (0, 1)
    shards = [real_train_dataset(data_config, **{**kwargs, "batch_size": kwargs["batch_size"] // 2,
                                                 "process_index": i, "process_count": 2})
              for i in range(2)]
    for parts in zip(*shards, strict=True):  # process 0's rows come first in the global batch
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  return train_dataset


@pytest.fixture(scope="module")
def runs(demo_data_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  one, two = str(tmp / "one"), str(tmp / "two")
  timings, cpu = {}, resource.getrusage(resource.RUSAGE_CHILDREN)

  start = time.perf_counter()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "train_dataset", two_process_batches(pipeline.train_dataset))
    single = train.train_and_evaluate(make_config(demo_data_dir, ONE_PROCESS_MESH), one)
  timings["one process"] = time.perf_counter() - start

  start = time.perf_counter()
  config_file = write_config_file(tmp / "config.py", demo_data_dir, TWO_PROCESS_MESH)
  records, output = run_two_processes(
      tmp, [f"--config={config_file}", f"--workdir={two}", f"--then_eval={one}"])
  timings["two processes"] = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  timings["two processes, CPU"] = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime

  start = time.perf_counter()
  one_config = make_config(demo_data_dir, ONE_PROCESS_MESH)
  eval_of_two = train.evaluate_checkpoint(one_config, two, "latest")
  directory, step = checkpoint.resolve(two, "latest")
  restored_two, _ = checkpoint.restore(
      directory, step, single["state"], num_labels=NUM_LABELS,
      model_config=train.model_from_config(one_config, NUM_LABELS).description)
  timings["cross evaluation"] = time.perf_counter() - start
  print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
  return {"single": single, "records": records, "output": output,
          "eval_of_two": eval_of_two, "restored_two": restored_two, "two": two}


def losses(train_log):
  return np.array([r["loss"] for r in train_log])


def test_both_processes_ran_on_the_two_process_mesh(runs):
  records = runs["records"]
  assert [r["process"] for r in records] == [[0, 2, 4], [1, 2, 4]]
  assert records[0]["mesh"] == {"data": 2, "fsdp": 2}
  assert "P(None, 'fsdp')" in records[0]["specs"]  # e.g. the in_proj kernel
  assert [r["step"] for r in records[0]["train_and_evaluate"]["train_log"]] == [1, 2, 3]
  # Both processes compute the same (replicated) losses and metrics.
  logs = [[{k: v for k, v in r.items() if "per_sec" not in k}
           for r in rec["train_and_evaluate"]["train_log"]] for rec in records]
  assert logs[0] == logs[1]
  assert records[0]["train_and_evaluate"]["reports"] == records[1]["train_and_evaluate"]["reports"]
  assert records[0]["then_eval"] == records[1]["then_eval"]
  assert sorted(os.listdir(os.path.join(runs["two"], "checkpoints"))) == [str(STEPS)]


def test_two_processes_give_the_losses_of_one(runs):
  two = losses(runs["records"][0]["train_and_evaluate"]["train_log"])
  one = losses(runs["single"]["train_log"])
  print("loss two processes", two.tolist(), "one process", one.tolist(),
        "max rel diff", float(np.max(np.abs(two / one - 1))))
  assert np.ptp(one) > 1e-2  # distinct batches and updates: not a comparison of constants
  np.testing.assert_allclose(two, one, rtol=1e-5)


def test_two_processes_give_the_parameters_of_one(runs):
  one, two = runs["single"]["state"], runs["restored_two"]
  assert int(two["step"]) == STEPS
  worst = 0.0
  for part in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(one[part]), jax.tree.leaves(two[part]), strict=True):
      a, b = np.asarray(a), np.asarray(b)
      worst = max(worst, float(np.max(np.abs(a - b))))
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  print("max |param difference|", worst)
  means = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(one["batch_stats"])
           if "mean" in jax.tree_util.keystr(path)]
  assert means and all(np.any(m != 0) for m in means)  # BatchNorm statistics were updated


def assert_same_reports(actual, expected):
  assert actual.keys() == expected.keys()
  for split in expected:
    for frac, values in expected[split]["known"].items():
      for name, value in values.items():
        assert actual[split]["known"][frac][name] == pytest.approx(value, rel=1e-4, abs=1e-5), \
            (split, frac, name)


def test_checkpoints_cross_between_one_and_two_processes(runs):
  # The two-process checkpoint (FSDP-sharded, written by 2 processes) in one process...
  assert_same_reports(runs["eval_of_two"], runs["records"][0]["train_and_evaluate"]["reports"])
  # ... and the one-process checkpoint (replicated) in two processes on the FSDP mesh.
  assert_same_reports(runs["records"][0]["then_eval"], runs["single"]["reports"])
  # Both runs end with the same metrics, too.
  assert_same_reports(runs["records"][0]["train_and_evaluate"]["reports"],
                      runs["single"]["reports"])


def test_only_process_zero_logs_info(runs):
  out0, out1 = runs["output"]
  info = re.compile(r"^\d\d:\d\d:\d\d (?!warning: |error: )", re.M)  # console.setup's lines
  assert re.search(r"^\d\d:\d\d:\d\d step 3/3", out0, re.M) and info.search(out0)
  assert "distributed: process 0 of 2 (flags); 2 local / 4 devices" in out0
  assert not info.search(out1), info.findall(out1)[:5]
  assert "Traceback" not in out1 and not re.search(r"^(error|E\d{4} )", out1, re.M)


def test_overlapping_async_saves_of_latest_and_best(tmp_path):
  """Both checkpoint managers save every step, asynchronously, in 2 processes.

  Their barriers once shared names: "Barrier ... is already ongoing", then a hang (without
  the fix this failed within 2 to 6 of these steps).
  """
  records, _ = run_two_processes(tmp_path, ["--config=configs/default.py",
                                            f"--workdir={tmp_path / 'w'}", "--save_both=12"],
                                 timeout_s=90)  # ~6 s when it works; a hang when it does not
  assert records[0]["specs"] == ["P()", "P(None, 'fsdp')"]  # w (8, 8): a tie, the last
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints"), key=int) == ["11", "12"]
  assert os.listdir(tmp_path / "w" / "best") == ["12"]


# ----------------------------------------------------------------------------- start-up rules

NO_TPU = {"TPU_SKIP_MDS_QUERY": "1"}


def arguments(environ=NO_TPU, **flags):
  values = {"coordinator_address": None, "num_processes": None, "process_id": None,
            "local_device_ids": None, "timeout": 300, "heartbeat_timeout": 60, **flags}
  return main.distributed_arguments(environ=environ, **values)


def test_single_process_does_not_initialise():
  assert arguments() is None
  slurm_one_task = {**NO_TPU, "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1",
                    "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  assert arguments(slurm_one_task) is None
  assert arguments({**NO_TPU, "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
                    "OMPI_COMM_WORLD_SIZE": "1"}) is None


def test_clusters_are_detected_and_flags_win():
  slurm = {**NO_TPU, "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-4]",
           "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
  timeouts = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60}
  assert arguments(slurm) == (timeouts, "SLURM")
  assert arguments(slurm, local_device_ids=["0", "1"]) == (
      {**timeouts, "local_device_ids": [0, 1]}, "SLURM")
  ompi = {**NO_TPU, "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
          "OMPI_COMM_WORLD_SIZE": "8"}
  assert arguments(ompi, num_processes=8) == ({"num_processes": 8, **timeouts}, "Open MPI")
  explicit = arguments(coordinator_address="h:1", num_processes=2, process_id=1, timeout=9,
                       heartbeat_timeout=20)
  assert explicit == ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
                       "initialization_timeout": 9, "heartbeat_timeout_seconds": 20}, "flags")


def test_cloud_tpu_vm_is_detected(monkeypatch):
  monkeypatch.setattr(main, "on_cloud_tpu_vm", lambda: True)
  assert arguments({}) == (
      {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60}, "Cloud TPU")
  assert arguments(NO_TPU) is None  # jax itself skips the metadata query then


@pytest.mark.parametrize("flags,match", [
    ({"coordinator_address": "h:1", "num_processes": 2}, "missing --process_id"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "below"),
    ({"local_device_ids": ["0"]}, "--local_device_ids is for multi-process runs"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
      "local_device_ids": ["a"]}, "comma-separated integers"),
])
def test_bad_distributed_flags_are_clear_errors(flags, match):
  with pytest.raises(ValueError, match=match):
    arguments(**flags)


def test_command_line_reports_incomplete_distributed_flags(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ctran_jax.main", "--config=configs/default.py",
       f"--workdir={tmp_path}", "--num_processes=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "TPU_SKIP_MDS_QUERY": "1"})
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: a multi-process run needs --coordinator_address" in out.stderr
  assert "Traceback" not in out.stderr
  assert not glob.glob(str(tmp_path / "*"))  # failed before touching the workdir
