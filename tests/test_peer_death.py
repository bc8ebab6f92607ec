"""A process that dies or hangs ends the whole multi-process job, within a bound, clearly.

Unit tests of `ctran_jax.watchdog` (the step watchdog with a fake exit, the one-line error
of a lost peer), then real two-process runs of `ctran_jax.main` (tests/multihost_worker.py,
2 fake CPU devices each, as in tests/test_multihost.py) in which process 1 is SIGKILLed or
hangs mid-training: process 0 must exit non-zero within the configured time with one line
saying why. tests/test_launch.py checks that launch/local.sh passes it on.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from test_multihost import REPO, free_port, write_config_file

from ctran_jax import main, watchdog

# ----------------------------------------------------------------------------- step watchdog


class FakeExit:
  def __init__(self):
    self.statuses = []

  def __call__(self, status):
    self.statuses.append(status)


def make_watchdog(timeout_s=0.3, **kwargs):
  exit, stream = FakeExit(), io.StringIO()
  dog = watchdog.Watchdog(timeout_s, process_index=3, exit=exit, poll_s=0.02, stream=stream,
                          **kwargs)
  return dog, exit, stream


def test_watchdog_fires_on_a_stall():
  dog, exit, stream = make_watchdog()
  dog.start()
  dog.pet()
  start = time.monotonic()
  dog.join(timeout=10)
  assert not dog._thread.is_alive()
  assert 0.25 < time.monotonic() - start < 5
  assert exit.statuses == [watchdog.STALLED_STATUS] and dog.fired
  assert stream.getvalue() == ("error (process 3): no training step finished in 0.3 s; a peer "
                               "process may have died or hung\n")


def test_watchdog_does_not_fire_while_petted_or_before_the_first_pet():
  dog, exit, stream = make_watchdog()
  dog.start()
  time.sleep(0.6)  # not armed yet: start-up is not timed
  for _ in range(40):  # 0.8 s of steps 0.02 s apart
    dog.pet()
    time.sleep(0.02)
  dog.stop()
  dog.join(timeout=5)
  assert exit.statuses == [] and not dog.fired and stream.getvalue() == ""


def test_watchdog_stopped_does_not_fire():
  dog, exit, _ = make_watchdog()
  dog.start()
  dog.pet()
  dog.stop()
  time.sleep(0.5)
  dog.join(timeout=5)
  assert exit.statuses == []


def test_watchdog_uses_its_clock():
  now = [100.0]
  dog, exit, _ = make_watchdog(timeout_s=600, clock=lambda: now[0])
  dog.start()
  dog.pet()
  now[0] += 599
  time.sleep(0.2)
  assert exit.statuses == []
  now[0] += 2
  dog.join(timeout=5)
  assert exit.statuses == [watchdog.STALLED_STATUS]


def test_module_pet_reaches_the_running_watchdog(monkeypatch):
  watchdog.pet()  # no watchdog: nothing happens
  dog, _, _ = make_watchdog()
  monkeypatch.setattr(watchdog, "_current", dog)
  watchdog.pet()
  assert dog._last is not None
  with pytest.raises(ValueError, match="positive"):
    watchdog.Watchdog(0)


# ----------------------------------------------------------------------------- lost peers

GLOO = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
        "Read error [127.0.0.1]:33682: Connection reset by peer")
HEARTBEAT = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
             "The tasks have crashed. Check the task logs for an earlier error.")
BARRIER = ("DEADLINE_EXCEEDED: Barrier timed out. Barrier_id: x. The following tasks did not "
           "reach the barrier: /job:jax_worker/replica:0/task:2")


def test_lost_peer_is_named_when_the_error_says_which():
  assert watchdog.lost_process(HEARTBEAT) == 1
  assert watchdog.lost_process(BARRIER) == 2
  assert watchdog.lost_process("UNAVAILABLE: Task 5 heartbeat timeout.") == 5
  assert watchdog.lost_process(GLOO) is None
  assert watchdog.describe_peer_failure(RuntimeError(HEARTBEAT), 0) == (
      "error (process 0): lost process 1 (it died or cannot be reached), stopping: "
      "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):")
  line = watchdog.describe_peer_failure(RuntimeError(GLOO), 1)
  assert line.startswith("error (process 1): lost a peer process (it died or cannot be "
                         "reached), stopping: UNKNOWN: Gloo all-reduce failed")
  assert "\n" not in line
  for text in (GLOO, HEARTBEAT, BARRIER):
    assert watchdog.is_peer_failure(RuntimeError(text))
  assert not watchdog.is_peer_failure(ValueError("config.batch_size=7 is not divisible"))


def test_uncaught_errors_exit_at_once_with_one_line(monkeypatch, capsys):
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
  exit = FakeExit()
  watchdog.exit_on_uncaught_error(0, exit=exit)
  try:
    raise RuntimeError(GLOO)
  except RuntimeError as e:
    sys.excepthook(type(e), e, e.__traceback__)
  err = capsys.readouterr().err
  assert exit.statuses == [watchdog.PEER_LOST_STATUS]
  assert err.startswith("error (process 0): lost a peer process") and err.count("\n") == 1
  # Any other error keeps its traceback and still ends the process.
  try:
    raise KeyError("a bug")
  except KeyError as e:
    sys.excepthook(type(e), e, e.__traceback__)
  err = capsys.readouterr().err
  assert exit.statuses[-1] == watchdog.ERROR_STATUS
  assert "Traceback" in err and "KeyError: 'a bug'" in err
  assert err.splitlines()[-1].startswith("error (process 0): KeyError (above)")


def test_distributed_flags_reach_jax():
  kwargs, how = main.distributed_arguments(
      coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids=None,
      timeout=30, heartbeat_timeout=7, environ={"TPU_SKIP_MDS_QUERY": "1"})
  assert kwargs["heartbeat_timeout_seconds"] == 7 and how == "flags"


# ----------------------------------------------------------------------------- real processes

HEARTBEAT_S = 10  # --heartbeat_timeout of the runs below
FAULT_OVERRIDES = {"num_train_steps": 2000, "eval_every_steps": 2000,
                   "checkpoint_every_steps": 2000, "log_every_steps": 1}


def run_with_fault(tmp_path, data_dir, fault: list[str], flags: list[str],
                   per_process: tuple[list[str], list[str]] = ([], []), timeout_s: float = 120):
  """Two processes of tests/multihost_worker.py with a fault in one; both waited for.

  Returns (exit statuses, outputs, exit times in s since the start), process 0 first; a
  process still running after `timeout_s` is killed and fails the test.
  """
  config = write_config_file(tmp_path / "config.py", data_dir,
                             {"mesh.fsdp": 2, **FAULT_OVERRIDES})
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0"}
  port, procs, logs = free_port(), [], [tmp_path / f"process{i}.log" for i in range(2)]
  start = time.monotonic()
  try:
    for i in range(2):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
             f"--config={config}", f"--workdir={tmp_path / 'w'}",
             f"--results={tmp_path / 'record'}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}", "--initialization_timeout=60",
             f"--heartbeat_timeout={HEARTBEAT_S}", *fault, *flags, *per_process[i]],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    ended = [None, None]
    while None in ended and time.monotonic() - start < timeout_s:
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.monotonic() - start
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [log.read_text() for log in logs]
  if None in ended:
    pytest.fail(f"still running after {timeout_s} s:\n" + "\n".join(
        f"--- process {i}\n{out[-3000:]}" for i, out in enumerate(outputs)))
  return [p.returncode for p in procs], outputs, ended


def console_lines(output: str) -> list[str]:
  """The lines a user reads: no Gloo connection notices."""
  return [line for line in output.splitlines() if line.strip() and not line.startswith("[Gloo]")]


def test_survivor_exits_soon_after_its_peer_is_killed(tmp_path, demo_data_dir):
  """Process 1 is SIGKILLed at its 4th batch. Process 0 sees it either at once (its Gloo
  collective fails: one line, status 76) or by the heartbeat timeout (jax aborts it from
  C++, naming task 1): within --heartbeat_timeout plus a margin either way."""
  statuses, outputs, ended = run_with_fault(
      tmp_path, demo_data_dir, ["--die_at_batch=4"], ["--step_timeout=60"])
  print("exit statuses", statuses, "exit times (s)", ended)
  assert statuses[1] == -signal.SIGKILL, outputs[1][-3000:]
  assert "FAULT: process 1 dies at batch 4" in outputs[1]
  after = ended[0] - ended[1]
  out0 = outputs[0]
  assert statuses[0] in (watchdog.PEER_LOST_STATUS, -signal.SIGABRT), out0[-3000:]
  assert after < HEARTBEAT_S + 15, (after, out0[-3000:])
  if statuses[0] == watchdog.PEER_LOST_STATUS:
    last = console_lines(out0)[-1]
    assert last.startswith("error (process 0): lost a peer process (it died or cannot be "
                           "reached), stopping: "), out0[-3000:]
    assert "Traceback" not in out0
  else:  # jax's own abort; the launcher adds the summary (test_launch.py)
    assert "stopped sending heartbeats" in out0 and "Traceback" not in out0, out0[-3000:]


def test_watchdog_ends_a_survivor_whose_peer_hangs(tmp_path, demo_data_dir):
  """Process 1 hangs at its 4th batch, alive (heartbeats go on) and without a watchdog of
  its own: process 0 waits in the step's collective until its --step_timeout, then exits
  with the watchdog's line; process 1 follows when the coordinator (process 0) is gone."""
  step_timeout = 20  # above the first step's compilation (~7 s here) with a margin for load
  statuses, outputs, ended = run_with_fault(
      tmp_path, demo_data_dir, ["--hang_at_batch=4"], [],
      per_process=([f"--step_timeout={step_timeout}"], ["--step_timeout=0"]))
  print("exit statuses", statuses, "exit times (s)", ended)
  assert "FAULT: process 1 hangs at batch 4" in outputs[1]
  assert statuses[0] == watchdog.STALLED_STATUS, outputs[0][-3000:]
  assert console_lines(outputs[0])[-1] == (
      f"error (process 0): no training step finished in {step_timeout} s; a peer process may "
      "have died or hung")
  assert statuses[1] != 0 and ended[1] - ended[0] < HEARTBEAT_S + 15, outputs[1][-3000:]


@pytest.mark.slow
def test_survivor_exits_when_the_coordinator_is_killed(tmp_path, demo_data_dir):
  """Process 0, which hosts jax's coordination service, is SIGKILLed: process 1 goes at
  once (jax aborts it: the service is unreachable)."""
  statuses, outputs, ended = run_with_fault(
      tmp_path, demo_data_dir, ["--die_at_batch=4", "--fault_process=0"], [])
  print("exit statuses", statuses, "exit times (s)", ended)
  assert statuses[0] == -signal.SIGKILL
  assert statuses[1] in (watchdog.PEER_LOST_STATUS, -signal.SIGABRT), outputs[1][-3000:]
  assert ended[1] - ended[0] < 15


@pytest.mark.slow
def test_local_sh_ends_the_job_when_a_trainer_dies(tmp_path, demo_data_dir):
  """launch/local.sh with the real trainer: process 1 dies at its 4th batch; local.sh exits
  with its status (137) soon after, naming it, and process 0 is gone."""
  config = write_config_file(tmp_path / "config.py", demo_data_dir,
                             {"mesh.fsdp": 2, **FAULT_OVERRIDES})
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=REPO, XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local.sh"), "-n", "2", "--cpu-devices=2",
       f"--log-dir={tmp_path / 'logs'}", "--kill-after=5", "--",
       sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
       f"--config={config}", f"--workdir={tmp_path / 'w'}", f"--results={tmp_path / 'r'}",
       "--die_at_batch=4", f"--heartbeat_timeout={HEARTBEAT_S}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 137, result.stderr[-3000:]
  assert "local.sh: process 1 failed first, status 137: killed by SIGKILL" in result.stderr
  assert result.stderr.splitlines()[-1].startswith(
      "local.sh: job failed: process 1 failed first (status 137: killed by SIGKILL)")
