"""Give the host memory that set-up phases freed back to the OS, so it is not peak RSS later.

Building the train state (random initialisation of every parameter inside one jitted
``init``) and compiling the train step both allocate hundreds of MB of temporaries on the
host. glibc's malloc keeps freed memory in its arenas instead of returning it, so on CPU
the train step's own buffers then come on top of it: C-Tran-R101 at 224^2 batch 2 peaked
at 4.2 GB instead of 3.4 GB (benchmarks/vs_torch.py, docs/benchmarks.md). The init
program is never run again, so its compiled executable and traces are dropped too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import jax


@functools.cache
def _malloc_trim():
  """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):
    return None


def release(*, drop_compiled: bool = False) -> bool:
  """Collect garbage and return freed heap pages to the OS; True if the heap was trimmed.

  ``drop_compiled`` also clears JAX's caches of traced and compiled functions (everything
  compiled so far is compiled again on its next call): for the moment after the train
  state is built, when the only thing compiled is its one-off initialiser.
  """
  if drop_compiled:
    jax.clear_caches()
  gc.collect()
  trim = _malloc_trim()
  return bool(trim is not None and trim(0))
