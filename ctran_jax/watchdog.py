"""A multi-process run that loses a process ends everywhere, soon, with one clear line.

Three mechanisms, installed by `ctran_jax.main` once the processes have joined
(`install`), each bounded in time:

* **Heartbeats** (jax's coordination service, ``--heartbeat_timeout``): a process that
  stops sending heartbeats is declared dead and every other process is terminated by jax
  itself (from C++: ``Terminating process because the JAX distributed service detected
  fatal errors``, then an abort, exit status 134). When process 0, which hosts the
  service, dies, the others are terminated at once.
* **Failed collectives**: where a collective fails instead of hanging (CPU: Gloo sees the
  closed connection at once), the exception reaches `exit_on_uncaught_error`'s hook:
  one line ``error (process N): lost a peer process ...`` and exit status
  `PEER_LOST_STATUS`, without jax's shutdown barrier (which would wait for the dead peer).
* **Step watchdog** (``--step_timeout``): a daemon thread that exits with
  `STALLED_STATUS` when `pet` was not called for that long, e.g. a process stuck in a
  collective whose peer hangs without dying (no heartbeat timeout then). The trainer pets
  it for every batch it puts on the devices (`ctran_jax.sharding.global_batch`), training
  and evaluation alike; it is armed by the first pet, so start-up (data preparation,
  restore, joining) is not timed.

Launchers (``launch/local.sh``, ``srun --kill-on-bad-exit``) then stop what is left.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging as std_logging
import os
import re
import sys
import threading
import time
import traceback

STALLED_STATUS = 75     # the step watchdog fired: no progress for --step_timeout seconds
PEER_LOST_STATUS = 76   # a collective or the coordination service reported a lost process
ERROR_STATUS = 1        # any other uncaught error in a multi-process run

# Error texts of a collective or of the coordination service that mean another process is
# gone (Gloo on CPU, NCCL on GPU, gRPC to the coordinator, its barriers and heartbeats).
_PEER_FAILURE = re.compile(
    r"Gloo|NCCL|coordination service|heartbeat|/task:\d+|[Bb]arrier|Socket closed|"
    r"[Cc]onnection (reset|closed|refused)|UNAVAILABLE")
# How the coordination service names a process: /job:jax_worker/replica:0/task:3, or
# "The following tasks are unhealthy (stopped sending heartbeats):\n3".
_TASK = re.compile(r"/task:(\d+)|stopped sending heartbeats\):\s*(\d+)|[Tt]ask (\d+) heartbeat")


class Watchdog:
  """Calls ``exit(STALLED_STATUS)`` after one line on stderr when `pet` was not called for
  ``timeout_s`` seconds. Armed by the first `pet`; `stop` disarms it for good."""

  def __init__(self, timeout_s: float, *, process_index: int = 0, exit=os._exit,
               clock=time.monotonic, poll_s: float | None = None, stream=None):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    self.timeout_s, self.process_index = timeout_s, process_index
    self._exit, self._clock, self._stream = exit, clock, stream
    self._poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 10)
    self._last: float | None = None  # time of the last pet; None: not armed yet
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="ctran-step-watchdog",
                                    daemon=True)
    self.fired = False

  def start(self) -> Watchdog:
    self._thread.start()
    return self

  def pet(self) -> None:
    """Progress was made (a float assignment: cheap enough for every step)."""
    self._last = self._clock()

  def stop(self) -> None:
    self._stopped.set()

  def join(self, timeout: float | None = None) -> None:
    self._thread.join(timeout)

  def message(self) -> str:
    seconds = f"{self.timeout_s:g}"
    return (f"error (process {self.process_index}): no training step finished in {seconds} s; "
            "a peer process may have died or hung")

  def _watch(self) -> None:
    while not self._stopped.wait(self._poll_s):
      last = self._last
      if last is None or self._clock() - last < self.timeout_s:
        continue
      if self._stopped.is_set():
        return
      self.fired = True
      line = self.message() + "\n"
      if self._stream is not None:
        self._stream.write(line)
      else:  # straight to the file descriptor: no Python lock another thread might hold
        os.write(2, line.encode())
      self._exit(STALLED_STATUS)
      return


_current: Watchdog | None = None


def pet() -> None:
  """Tell the step watchdog that training (or evaluation) made progress; a no-op when no
  watchdog runs (single process, ``--step_timeout=0``)."""
  if _current is not None:
    _current.pet()


def start(timeout_s: float, process_index: int, **kwargs) -> Watchdog:
  """Start the process's step watchdog (stopped at interpreter exit, before jax's shutdown
  barrier, so that waiting there for slower processes is never taken for a stall)."""
  global _current
  if _current is not None:
    _current.stop()
  _current = Watchdog(timeout_s, process_index=process_index, **kwargs).start()
  atexit.register(_current.stop)
  return _current


def stop() -> None:
  global _current
  if _current is not None:
    _current.stop()
    _current = None


def lost_process(text: str) -> int | None:
  """The process (coordination-service task) an error message names as lost, if any."""
  match = _TASK.search(text)
  if match is None:
    return None
  return int(next(g for g in match.groups() if g is not None))


def is_peer_failure(error: BaseException) -> bool:
  """An error that says a collective or the coordination service lost another process."""
  return bool(_PEER_FAILURE.search(str(error)))


def describe_peer_failure(error: BaseException, process_index: int) -> str:
  """``error (process 0): lost process 1 ...``: one line for a lost peer."""
  text = str(error)
  lost = lost_process(text)
  first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
  if len(first) > 240:
    first = first[:237] + "..."
  who = f"process {lost}" if lost is not None and lost != process_index else "a peer process"
  return (f"error (process {process_index}): lost {who} (it died or cannot be reached), "
          f"stopping: {first}")


def _flush_logs() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  for handler in std_logging.getLogger().handlers:
    try:
      handler.flush()
    except (OSError, ValueError):
      pass


def exit_on_uncaught_error(process_index: int, *, show_traceback: bool = False,
                           exit=os._exit) -> None:
  """Uncaught errors end this process at once, skipping jax's shutdown barrier.

  Without this, a process whose collective failed would print its traceback and then wait
  in the shutdown barrier for the dead peer until the heartbeat timeout, and abort from
  C++ with a page of stack dumps. A lost peer gives one line (the traceback only with
  ``show_traceback``) and `PEER_LOST_STATUS`; any other error its usual traceback and a
  line, and `ERROR_STATUS`.
  """
  def hook(kind, error, tb):
    if issubclass(kind, KeyboardInterrupt):
      sys.__excepthook__(kind, error, tb)
      _flush_logs()
      exit(130)
      return
    peer = is_peer_failure(error)
    if show_traceback or not peer:
      traceback.print_exception(kind, error, tb)
    if peer:
      line = describe_peer_failure(error, process_index)
      status = PEER_LOST_STATUS
    else:
      line = (f"error (process {process_index}): {kind.__name__} (above); stopping this "
              "process so that the others do not wait for it")
      status = ERROR_STATUS
    print(line, file=sys.stderr)
    _flush_logs()
    exit(status)

  sys.excepthook = hook


def quiet_fatal_dumps() -> None:
  """When jax aborts the process from C++ (a lost peer), Python's fault handler (enabled by
  absl) dumps the stack of every thread; the aborting thread's is all that helps."""
  if faulthandler.is_enabled():
    faulthandler.enable(all_threads=False)


def install(*, process_index: int, step_timeout: float, show_traceback: bool = False) -> None:
  """Everything above for one process of a multi-process run (`ctran_jax.main`)."""
  exit_on_uncaught_error(process_index, show_traceback=show_traceback)
  quiet_fatal_dumps()
  if step_timeout > 0:
    start(step_timeout, process_index)
