r"""Train or evaluate C-Tran.

    python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/ctran_demo
    python -m ctran_jax.main --config=configs/coco.py --workdir=gs://bucket/coco \
        --config.batch_size=64
    python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/ctran_demo \
        --mode=eval --checkpoint=best

``--mode=train`` (default) trains, evaluates every ``config.eval_every_steps``, checkpoints,
and resumes from the workdir's latest checkpoint when there is one. ``--mode=eval``
evaluates ``--checkpoint`` (latest, best, or a step directory) and writes
``WORKDIR/eval/results.json``. Any config value can be overridden with
``--config.<key>=<value>``; a misspelt key is an error.

Several processes (hosts) run the same command, one per host (or per accelerator). Under
SLURM (``srun``), Open MPI (``mpirun``), on Cloud TPU VMs (and Kubernetes indexed jobs with
the ``kubernetes`` package) `jax.distributed.initialize` reads the layout from the
environment; anywhere else pass it::

    python -m ctran_jax.main --config=... --workdir=/shared/run \
        --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK

The workdir must be shared storage (NFS, gs://): every process takes part in saving
checkpoints. Process 0 logs at INFO and alone writes TensorBoard and the eval reports;
the other processes log warnings and errors only. A single process never initialises the
distributed runtime. When a process dies or hangs, the others exit non-zero within
``--heartbeat_timeout`` or ``--step_timeout`` (`ctran_jax.watchdog`, launch/README.md).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from ctran_jax import console, watchdog

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(), e.g. configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "show_config"],
                          "train (and evaluate), eval (a checkpoint), or show_config (print "
                          "every config key with its value and comment, then exit).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every log line on the console (absl's "
                             "full format, library INFO lines, the whole config).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "--mode=eval: 'latest', 'best' or a "
                                  "checkpoint step directory.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of known errors "
                               "(bad config, data or checkpoint) instead of one line.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: host:port where process 0 serves the "
    "coordinator (the same on every process). Detected under SLURM, Open MPI, Cloud TPU.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: the number "
                                      "of processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's "
                                   "index, 0 .. num_processes - 1.", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Multi-process run: the local accelerators this process uses, "
    "e.g. 0,1 (default: all visible; SLURM/Open MPI detection gives each process the one of "
    "its local rank, so pass all of them when a process drives several).")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Multi-process run: "
                                     "seconds to wait for every process to connect; then "
                                     "jax aborts the process (DEADLINE_EXCEEDED).",
                                     lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Multi-process run: seconds without a heartbeat after which "
    "jax's coordination service declares a process dead and terminates all the others "
    "(jax's own default: 100).", lower_bound=1)
_STEP_TIMEOUT = flags.DEFINE_integer(
    "step_timeout", 600, "Multi-process run: exit (status 75) when no batch reached the "
    "devices (training or evaluation) for this many seconds, e.g. a process stuck in a "
    "collective with a hung peer; counted from the first batch. 0 = off.", lower_bound=0)
flags.mark_flags_as_required(["config"])
USAGE = """Usage: python -m ctran_jax.main --config=configs/default.py --workdir=DIR [flags]

  --config.<key>=<value>     override any config key (--mode=show_config lists them all)
  --mode=eval --checkpoint=best|latest|DIR/checkpoints/<step>   evaluate a checkpoint
"""


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not connect."""


def _count(environ, key: str) -> int:
  try:
    return int(environ.get(key, "1"))
  except ValueError:
    return 1


def on_cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached: a Cloud TPU VM, maybe one host of a pod slice
  (jax then asks the VM metadata server how many workers there are)."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def detect_cluster(environ=os.environ) -> str | None:
  """The multi-process launcher that `jax.distributed.initialize()` can read, if any.

  Mirrors the environments jax 0.10 auto-detects (``jax/_src/clusters``), counting a
  launcher only when it started several processes: a one-task SLURM job or a plain
  ``python`` on a workstation stays a single process. mpi4py detection is opt-in in jax
  and not used here.
  """
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(k in environ for k in slurm) and _count(environ, "SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "TPU_SKIP_MDS_QUERY" not in environ and on_cloud_tpu_vm():
    return "Cloud TPU"
  if ("KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ
      and importlib.util.find_spec("kubernetes") is not None):
    return "Kubernetes"
  return None


def distributed_arguments(*, coordinator_address: str | None, num_processes: int | None,
                          process_id: int | None, local_device_ids: list[str] | None,
                          timeout: int, heartbeat_timeout: int = 60,
                          environ=os.environ) -> tuple[dict, str] | None:
  """(`jax.distributed.initialize` keyword arguments, how detected), or None: one process.

  Explicit flags win over detection; without a detected cluster all three of
  coordinator/num_processes/process_id are needed.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  explicit = {k: v for k, v in given.items() if v is not None}
  cluster = detect_cluster(environ)
  if not explicit and cluster is None:
    if local_device_ids:
      raise ValueError("--local_device_ids is for multi-process runs: add "
                       "--coordinator_address, --num_processes and --process_id")
    return None
  if cluster is None and len(explicit) < len(given):
    missing = ", ".join(f"--{k}" for k in given if k not in explicit)
    raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and "
                     f"--process_id together (missing {missing}); under SLURM, Open MPI or "
                     "on Cloud TPU they are detected")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  kwargs = {**explicit, "initialization_timeout": timeout,
            "heartbeat_timeout_seconds": heartbeat_timeout}
  if local_device_ids:
    try:
      kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
    except ValueError:
      raise ValueError(f"--local_device_ids={','.join(local_device_ids)}: expected "
                       "comma-separated integers such as 0,1") from None
  return kwargs, ("flags" if cluster is None else cluster)


def initialize_distributed(*, step_timeout: float = 0, show_traceback: bool = False,
                           **flag_values) -> str | None:
  """Join the other processes (before any other JAX call); a description, or None.

  Then a lost process ends this one within a bounded time (`ctran_jax.watchdog`): jax's
  heartbeats, a one-line exit when a collective fails, and the step watchdog when
  ``step_timeout`` > 0.
  """
  arguments = distributed_arguments(**flag_values)
  if arguments is None:
    return None
  kwargs, how = arguments
  import jax

  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 - jax raises runtime errors of several types
    where = kwargs.get("coordinator_address") or f"the coordinator ({how})"
    raise DistributedError(f"could not join {where} within {kwargs['initialization_timeout']} "
                           f"s as process {kwargs.get('process_id', '?')}: check the address, "
                           f"that all processes were started, and the port: {e}") from e
  from ctran_jax import watchdog

  watchdog.install(process_index=jax.process_index(), step_timeout=step_timeout,
                   show_traceback=show_traceback)
  return (f"process {jax.process_index()} of {jax.process_count()} ({how}); "
          f"{jax.local_device_count()} local / {jax.device_count()} devices")


def config_comments(config_file: str) -> dict[str, str]:
  """``{dotted key: comment}`` from the ``c.<key> = value  # comment`` lines of a config
  file and of the config files it loads with `load_sibling` (configs/default.py)."""
  import re

  path = config_file.split(":")[0]
  folder = os.path.dirname(os.path.abspath(path))
  comments, files = {}, [os.path.join(folder, "default.py"), path]
  for name in files:
    if not os.path.exists(name):
      continue
    found = {}
    with open(name) as f:
      for line in f:
        match = re.match(r"\s*c\.([\w.]+)\s*=.*?#\s*(.+)$", line)
        if match:  # the first comment of a key in a file: the main recipe, not a variant
          found.setdefault(match.group(1), match.group(2).strip())
    comments.update(found)
  return comments


def show_config(config, config_file: str) -> str:
  """Every config key with its value and the comment beside it in the config file."""
  comments = config_comments(config_file)
  rows = []

  def walk(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        rows.append((f"{prefix}{key}", repr(value), comments.get(f"{prefix}{key}", "")))

  walk(config)
  key_w = max(len(r[0]) for r in rows)
  value_w = min(max(len(r[1]) for r in rows), 28)
  return "\n".join(f"{k:<{key_w}}  {v:<{value_w}}  {('# ' + c) if c else ''}".rstrip()
                   for k, v, c in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  if _MODE.value == "show_config":
    print(show_config(config, config_file))
    return
  if not workdir:
    _exit_with_error(ValueError("--workdir is required (where checkpoints, logs and "
                                "reports go)"), "")
  console.setup(verbose=_VERBOSE.value, chief=False)  # until this process is known to be 0
  try:
    joined = initialize_distributed(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, local_device_ids=_LOCAL_DEVICE_IDS.value,
        timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
        step_timeout=_STEP_TIMEOUT.value, show_traceback=_TRACEBACK.value)
  except (ValueError, DistributedError) as e:
    _exit_with_error(e, "")
  where, chief = "", True
  if joined:
    import jax

    where, chief = f" (process {jax.process_index()})", jax.process_index() == 0
  console.setup(verbose=_VERBOSE.value, chief=chief)
  if not chief:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's C++ INFO lines, too

  try:
    os.makedirs(workdir, exist_ok=True)
    if chief:
      console.log_to_file(os.path.join(workdir, "log.txt"))
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  except OSError as e:
    _exit_with_error(OSError(f"workdir {workdir!r} is not writable: {e.strerror or e}"), where)
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  logging.info("ctran_jax %s  %s%s", _MODE.value, config_file,
               f"  overrides: {' '.join(overrides)}" if overrides else "")
  logging.info("workdir  %s  (config.json: every setting; log.txt: the full log)", workdir)
  if joined:
    logging.info("distributed: %s", joined)
  logging.info("config:\n%s", config)  # log.txt only (console.FILE_ONLY)

  # Imported here so that --help and flag errors are instant (TF + JAX import takes
  # seconds), and after jax.distributed.initialize; TensorFlow's start-up notices dropped.
  with console.quiet_native_stderr():
    from ctran_jax import checkpoint, train

  known_errors = (ValueError, OSError, checkpoint.CheckpointError, FloatingPointError)
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
  except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint, no background threads' noise
    logging.warning("interrupted%s: stopped without saving; the last checkpoint is intact",
                    where)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  except known_errors as e:
    _exit_with_error(e, where)
  except Exception as e:  # noqa: BLE001 - one line here, the traceback in log.txt
    if joined and watchdog.is_peer_failure(e):  # a collective lost its peer
      logging.info("traceback:\n%s", "".join(traceback.format_exception(e)))
      print(watchdog.describe_peer_failure(e, jax.process_index()), file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(watchdog.PEER_LOST_STATUS)
    _exit_with_error(e, where, status=1, unexpected=True)


def _exit_with_error(error: Exception, where: str, *, status: int = 2,
                     unexpected: bool = False):
  """One line on stderr (any process: errors are never filtered), the traceback in the log
  file only (on the console too with --traceback), then exit with `status`."""
  if _TRACEBACK.value:
    raise error
  text = "".join(traceback.format_exception(error))
  logging.info("traceback:\n%s", text)  # log.txt only (console.FILE_ONLY)
  message = str(error).strip() or type(error).__name__
  if unexpected:
    message = (f"unexpected {type(error).__name__}: {message.splitlines()[0]} (the traceback "
               "is in WORKDIR/log.txt; --traceback shows it here)")
  print(f"error{where}: {message}", file=sys.stderr)
  if where:  # several processes: sys.exit would wait in jax's shutdown barrier for the rest
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for a misspelt ``--config.<key>``.

  ml_collections reports an unknown key as an AttributeError/KeyError from deep inside
  absl; a user should see the key, the suggestion and nothing else.
  """
  if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(USAGE)
    print(flags.FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpshort to see the flags.", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    detail = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ")
    detail = detail.replace("\\'", "'").replace("\n", " ")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config key {detail} (overrides given: {', '.join(overrides)}); "
          "the keys are listed in the config file's get_config()", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
