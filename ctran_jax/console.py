"""What a user sees in the terminal: concise log lines, a header, progress, no library noise.

The console gets one short line per event (``12:03:04 message``); ``WORKDIR/log.txt``
gets everything in absl's full format, library INFO lines included, and ``--verbose``
brings all of it back to the console. Noise is removed only where it is known to carry
nothing for the user: TensorFlow's start-up notices from C++ (matched line by line while
TensorFlow is imported; any other line is passed through) and a few library messages
matched exactly (`KNOWN_NOISE`). Our own warnings and errors are never filtered.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import tempfile
import time

from absl import logging

# Lines TensorFlow's C++ runtime prints on import (before absl::InitializeLog).
NATIVE_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is "
               r"optimized"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)
# Python log records (logger message starts) that say nothing a user can act on.
KNOWN_NOISE = (
    # tf.data inside TFDS's reader, not our code.
    "From {path}: CounterV2 (from tensorflow.python.data.experimental.ops.counter) is "
    "deprecated",
    # TFDS before a generated dataset is built: it is about to be generated.
    "Variant folder ",
    # jax looking for TPUs on a machine without them.
    "Unable to initialize backend 'tpu'",
    # orbax reading only some items of a checkpoint (export, predict from a workdir).
    'Item "{path}" was found in the checkpoint, but could not be restored',
)
# Our own INFO lines that belong in log.txt only (the whole config).
FILE_ONLY = ("config:\n", "traceback:\n")
_LIBRARY_PATHS = tuple(f"{os.sep}{name}{os.sep}" for name in
                       ("orbax", "tensorflow_datasets", "jax", "clu", "tensorflow"))


@contextlib.contextmanager
def quiet_native_stderr():
  """Capture file descriptor 2 during the block (TensorFlow's import), then re-emit every
  line that is not known start-up noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode(errors="replace")
      kept = [line for line in text.splitlines()
              if line.strip() and not any(p.search(line) for p in NATIVE_NOISE)]
      if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)


def quiet_tool() -> None:
  """For the command-line tools other than main (predict, export_model, serve, serving):
  TensorFlow's start-up lines and `KNOWN_NOISE` dropped; every other warning kept."""
  with quiet_native_stderr():
    import tensorflow  # noqa: F401  (imported here so that its start-up lines are captured)
  absl_logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _ConsoleFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_ConsoleFilter())


class _ConsoleFilter(std_logging.Filter):
  """Our INFO lines and everyone's warnings and errors, minus `KNOWN_NOISE`."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    if message.startswith(FILE_ONLY):
      return False
    if any(message.startswith(n.split("{path}")[0]) and n.split("{path}")[-1] in message
           for n in KNOWN_NOISE):
      return False
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(p in record.pathname for p in _LIBRARY_PATHS)


class _ConsoleFormatter(std_logging.Formatter):
  def format(self, record) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname.lower()}: "
    return f"{stamp} {level}{record.getMessage()}"


def setup(*, verbose: bool, chief: bool = True) -> None:
  """Console logging: concise lines (process 0: INFO; others: warnings) unless `verbose`."""
  handler = logging.get_absl_handler()
  logging.set_verbosity(logging.INFO if chief or verbose else logging.WARNING)
  if verbose:
    return
  handler.setFormatter(_ConsoleFormatter())
  for old in [f for f in handler.filters if isinstance(f, _ConsoleFilter)]:
    handler.removeFilter(old)
  handler.addFilter(_ConsoleFilter())


def log_to_file(path: str) -> None:
  """Also write every log record, in absl's full format, to `path` (appended)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  handler = std_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)


class ProgressBar:
  """A one-line progress bar on a terminal; a line per quarter in a log file."""

  def __init__(self, total: int, label: str, stream=None):
    self.total, self.label, self.done = max(total, 1), label, 0
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self._shown = -1
    self._start = time.perf_counter()

  def update(self, n: int = 1) -> None:
    self.done = min(self.done + n, self.total)
    fraction = self.done / self.total
    if self.tty:
      percent = int(100 * fraction)
      if percent != self._shown:
        bar = "#" * (percent // 4) + "." * (25 - percent // 4)
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}%")
        self.stream.flush()
        self._shown = percent
    elif int(4 * fraction) > self._shown:
      self._shown = int(4 * fraction)
      if self._shown < 4:
        self.stream.write(f"{self.label}: {self._shown * 25}%\n")
        self.stream.flush()

  def close(self) -> None:
    seconds = time.perf_counter() - self._start
    self.stream.write(("\r" if self.tty else "") + f"{self.label}: done in {seconds:.0f} s"
                      + (" " * 20 if self.tty else "") + "\n")
    self.stream.flush()


def format_seconds(seconds: float) -> str:
  """1m05s / 2h03m / 12.3 s."""
  seconds = max(seconds, 0.0)
  if seconds < 60:
    return f"{seconds:.1f} s"
  whole = int(seconds)
  if whole >= 3600:
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
  return f"{whole // 60}m{whole % 60:02d}s"
