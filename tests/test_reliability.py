"""Faults a long run meets: stop signals, kill -9, corrupt checkpoints, NaN, full disks,
changed settings on resume. Each case of docs/reliability.md has its test here.

The command-line cases run the real main in a subprocess on the tiny demo (about 20 s
each); the others run `train.train_and_evaluate` in-process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, TINY_RUN, tiny_run_config, write_config_file

from ctran_jax import checkpoint, resilience, train
from ctran_jax.data import pipeline

STEPS = 24
RUN = {**TINY_RUN, "num_train_steps": STEPS, "log_every_steps": 1, "eval_every_steps": 12,
       "checkpoint_every_steps": 4}


def command(config_file, workdir):
  return [sys.executable, "-m", "ctran_jax.main", f"--config={config_file}",
          f"--workdir={workdir}"]


def start(config_file, workdir):
  return subprocess.Popen(command(config_file, workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(process, pattern, timeout=300):
  """Read the process's output until a line matches; returns the lines read so far."""
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line:
      break
    lines.append(line)
    if re.search(pattern, line):
      return lines
  raise AssertionError(f"{pattern!r} never appeared:\n{''.join(lines)[-3000:]}")


def finish(process, timeout=300):
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def results(workdir):
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    return json.load(f)


def assert_same_results(a, b):
  assert a["step"] == b["step"]
  for split, report in a["splits"].items():
    for frac, values in report["known"].items():
      for name, value in values.items():
        assert value == pytest.approx(b["splits"][split]["known"][frac][name], abs=1e-6), (
            split, frac, name)


@pytest.fixture(scope="module")
def config_file(demo_data_dir, tmp_path_factory):
  return write_config_file(tmp_path_factory.mktemp("cfg") / "run.py",
                           **{**RUN, "data.data_dir": demo_data_dir})


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  out = subprocess.run(command(config_file, workdir), cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return results(workdir)


# ----------------------------------------------------------------------------- stop signals

@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_stop_signal_saves_exits_zero_and_the_rerun_ends_the_same(
    config_file, uninterrupted, tmp_path, sig):
  workdir = str(tmp_path / "run")
  process = start(config_file, workdir)
  wait_for(process, r"step +5/24")
  process.send_signal(sig)
  status, out = finish(process)
  assert status == 0, out[-3000:]
  match = re.search(rf"stopped at step (\d+) on {sig.name}: checkpoint \d+ saved", out)
  assert match and "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  stopped = int(match.group(1))
  assert 5 <= stopped < STEPS and stopped in checkpoint.Checkpoints(workdir).steps()
  rerun = subprocess.run(command(config_file, workdir), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed  from checkpoint {stopped}" in rerun.stderr
  assert_same_results(results(workdir), uninterrupted)
  with open(os.path.join(workdir, "eval", "history.jsonl")) as f:
    entries = [(e["step"], e["split"]) for e in map(json.loads, f)]
  assert len(entries) == len(set(entries)), entries  # no duplicate after the resume


@pytest.mark.slow  # CI time; run with -m slow
def test_a_second_ctrl_c_stops_at_once(config_file, tmp_path):
  process = start(config_file, str(tmp_path / "run"))
  wait_for(process, r"step +3/24")
  process.send_signal(signal.SIGINT)
  process.send_signal(signal.SIGINT)
  status, out = finish(process)
  assert status in (0, 130), out[-3000:]  # 0 when the first one's save won the race
  assert "Traceback" not in out and "Event loop is closed" not in out


def kill_and_resume(config_file, workdir, pattern, delay):
  """kill -9 after `pattern` (+ delay s), then run to the end; returns the rerun's output."""
  process = start(config_file, workdir)
  wait_for(process, pattern)
  time.sleep(delay)
  process.kill()
  process.communicate(timeout=60)
  rerun = subprocess.run(command(config_file, workdir), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  return rerun.stderr


def test_kill_9_during_a_save_resumes_to_the_same_result(config_file, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  kill_and_resume(config_file, workdir, r"saved +checkpoint 8", 0.0)  # save 8 in flight
  assert_same_results(results(workdir), uninterrupted)
  tmp = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if not n.isdigit()]
  assert not tmp, tmp  # a half-written step directory was cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_moments(config_file, uninterrupted, tmp_path, seed):
  rng = np.random.default_rng(seed)
  workdir = str(tmp_path / "run")
  kill_and_resume(config_file, workdir, rf"step +{rng.integers(2, 20)}/24",
                  float(rng.uniform(0, 2)))
  assert_same_results(results(workdir), uninterrupted)


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def short_run(demo_data_dir, tmp_path_factory):
  """A finished 8-step run (checkpoints 4 and 8) and its results, to copy and damage."""
  workdir = str(tmp_path_factory.mktemp("short") / "run")
  result = train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)
  return workdir, result


def largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(short_run, demo_data_dir,
                                                               tmp_path, damage, caplog):
  source, expected = short_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  victim = largest_file(os.path.join(workdir, "checkpoints", "8", "state"))
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)
  else:
    os.remove(victim)
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)
  lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("checkpoint 8 is unreadable, moved to")
  assert os.path.isdir(os.path.join(workdir, "corrupt", "8"))
  assert [r["step"] for r in result["train_log"]] == [5, 6, 7, 8]  # redone from step 4
  for split in ("validation", "test"):
    assert result["reports"][split]["known"]["0"]["mAP"] == pytest.approx(
        expected["reports"][split]["known"]["0"]["mAP"], abs=1e-6)


def test_no_usable_checkpoint_is_one_clear_error(short_run, demo_data_dir, tmp_path):
  source, _ = short_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  for step in ("4", "8"):
    os.remove(largest_file(os.path.join(workdir, "checkpoints", step, "state")))
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* could be read"):
    train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 32, "batch_size: checkpoint has 16, config has 32"),
    ("optimizer.name", "sgd", "optimizer.name: checkpoint has 'adam', config has 'sgd'"),
    ("num_train_steps", 12, "num_train_steps: checkpoint has 8, config has 12"),
])
def test_resuming_with_changed_settings_is_refused_naming_them(short_run, demo_data_dir,
                                                             tmp_path, key, value, match):
  source, _ = short_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  with pytest.raises(ValueError, match=match) as error:
    train.train_and_evaluate(tiny_run_config(demo_data_dir, **{key: value}), workdir)
  assert "\n" not in str(error.value) and "partial_restore" not in str(error.value)


def test_settings_that_do_not_change_the_run_may_change(short_run, demo_data_dir, tmp_path):
  source, _ = short_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  result = train.train_and_evaluate(
      tiny_run_config(demo_data_dir, **{"eval.batch_size": 16, "log_every_steps": 2,
                                        "mesh.num_devices": 2}), workdir)
  assert result["train_log"] == [] and result["reports"]["test"]["num_examples"] == 100


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_older_checkpoint(
    demo_data_dir, tmp_path, monkeypatch):
  original, calls = ocp.CheckpointManager.save, []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if step == 8:
      raise OSError(errno.ENOSPC, "No space left on device", f"{self.directory}/8")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)
  message = str(error.value)
  assert message.startswith("saving checkpoint 8 to ") and "\n" not in message
  assert "No space left on device" in message and "previous checkpoints are intact" in message
  assert checkpoint.Checkpoints(workdir).steps() == [4]
  assert not os.path.exists(os.path.join(workdir, "eval", "results.json"))


def test_an_unwritable_workdir_is_one_line(config_file, tmp_path):
  (tmp_path / "a_file").write_text("not a directory")
  out = subprocess.run(command(config_file, str(tmp_path / "a_file" / "run")), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: workdir ") and "a_file/run" in lines[-1]
  assert "Not a directory" in lines[-1] and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- non-finite steps

def poisoned(train_dataset, bad_step):
  """`pipeline.train_dataset` whose batch number `bad_step` (0-based) has a NaN image."""
  def wrapped(source, **kwargs):
    for step, batch in enumerate(train_dataset(source, **kwargs), kwargs["start_step"]):
      if step == bad_step:
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch
  return wrapped


def test_nan_stops_naming_the_step_and_batch_and_saves_nothing_non_finite(
    demo_data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "train_dataset", poisoned(pipeline.train_dataset, 5))
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)
  message = str(error.value)
  assert "non-finite at step 6 (example ids " in message
  assert "nothing non-finite was saved; last good checkpoint: checkpoints/4" in message
  assert checkpoint.Checkpoints(workdir).steps() == [4]


def test_nan_skip_policy_skips_and_counts(demo_data_dir, tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(pipeline, "train_dataset", poisoned(pipeline.train_dataset, 5))
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(
        tiny_run_config(demo_data_dir, nan_policy="skip"), str(tmp_path / "run"))
  assert any("skipped 1 non-finite step(s) so far (the first at step 6" in r.getMessage()
             for r in caplog.records)
  log = {r["step"]: r for r in result["train_log"]}
  assert log[6]["nonfinite_steps"] == 1 and not np.isfinite(log[6]["loss"])  # its own loss
  assert log[7]["nonfinite_steps"] == 0 and np.isfinite(log[7]["loss"])
  health = jax.device_get(result["state"]["health"])
  assert int(health["nonfinite_steps"]) == 1 and int(health["consecutive"]) == 0
  assert bool(resilience.all_finite(result["state"]["params"]))


@pytest.mark.slow  # CI time; run with -m slow
def test_too_many_non_finite_steps_in_a_row_stop_the_skip_policy(demo_data_dir, tmp_path,
                                                                 monkeypatch):
  def always_nan(source, **kwargs):
    for batch in original(source, **kwargs):
      yield {**batch, "image": np.full_like(batch["image"], np.nan)}

  original = pipeline.train_dataset
  monkeypatch.setattr(pipeline, "train_dataset", always_nan)
  with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row .*"
                     r"max_consecutive_nonfinite=2"):
    train.train_and_evaluate(tiny_run_config(demo_data_dir, nan_policy="skip",
                                             max_consecutive_nonfinite=2),
                             str(tmp_path / "run"))


# ----------------------------------------------------------------------------- two processes

def test_sigterm_to_one_process_stops_all_at_one_step(demo_data_dir, tmp_path):
  """JAX's preemption service: a notice to process 1 makes both save the same step, exit 0."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  config = write_config_file(tmp_path / "run.py", **{
      **RUN, "data.data_dir": demo_data_dir, "num_train_steps": 200, "eval_every_steps": 100,
      "checkpoint_every_steps": 100, "mesh.fsdp": 2, "data.test_split": ""})
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  workdir = str(tmp_path / "run")
  procs = [subprocess.Popen(
      command(config, workdir) + [f"--coordinator_address=127.0.0.1:{port}",
                                  "--num_processes=2", f"--process_id={i}",
                                  "--initialization_timeout=60"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    wait_for(procs[0], r"step +4/200")
    procs[1].send_signal(signal.SIGTERM)
    outputs = [finish(p, timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [status for status, _ in outputs] == [0, 0], [out[-2000:] for _, out in outputs]
  stops = [re.search(r"stopped at step (\d+) on SIGTERM", out) for _, out in outputs]
  assert stops[0], outputs[0][1][-2000:]  # process 1 logs warnings too, but may say less
  stopped = int(stops[0].group(1))
  assert stopped < 200 and checkpoint.Checkpoints(workdir).steps()[0] == stopped
