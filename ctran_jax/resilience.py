"""What keeps a long run safe: stop requests, non-finite steps, and resuming the same run.

* `StopRequest`: SIGTERM (a TPU maintenance or Spot notice, SLURM ``--signal``,
  Kubernetes) or Ctrl-C asks the loop to finish its step, save a checkpoint and exit 0; a
  second Ctrl-C stops at once. With several processes JAX's preemption service owns
  SIGTERM and agrees on one step for all (`multihost_utils.reached_preemption_sync_point`);
  Ctrl-C is turned into that same notice.
* `Health`: the train step skips any update whose loss or gradient norm is not finite
  (on the device, every step) and counts it; the host reads the counters at every log step
  and before every save, and stops (``nan_policy="stop"``) or tolerates up to
  ``max_consecutive_nonfinite`` in a row (``"skip"``). A non-finite state is never saved.
* `changed_settings`: a resumed run must be the run that wrote the checkpoint; settings
  that change its trajectory are compared and a difference is an error naming the keys.
"""

from __future__ import annotations

import collections
import os
import signal
import threading

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

from ctran_jax.config_util import check_choice

NAN_POLICIES = ("stop", "skip")


# ----------------------------------------------------------------------------- stop requests

class StopRequest:
  """Signal handlers for the duration of a training loop (a context manager)."""

  def __init__(self):
    self.signal_name = None
    self._unreported = False
    self._multi = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    wanted = [signal.SIGINT] + ([] if self._multi else [signal.SIGTERM])
    for sig in wanted:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    # No logging here: the handler may interrupt a log call of the main thread, and
    # logging's stream is not re-entrant. `should_stop` reports the signal.
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.signal_name, self._unreported = name, True
    if self._multi and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice, shared by all processes

  def should_stop(self, step: int) -> bool:
    """True on the step at which every process stops (call after every step)."""
    if self._unreported:
      self._unreported = False
      logging.warning("%s received: finishing this step, saving a checkpoint, then exiting "
                      "(Ctrl-C again to stop at once)", self.signal_name)
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None


# ----------------------------------------------------------------------------- non-finite steps

def initial_health() -> dict:
  """Device-side counters kept in the train state."""
  return {"nonfinite_steps": jnp.zeros((), jnp.int32), "consecutive": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def guarded_update(finite, step, compute_new, old: dict, health: dict) -> tuple[dict, dict]:
  """In the jitted step: ``compute_new()`` if the step was finite, else `old`; update the
  counters.

  A `jax.lax.cond`, not a select of both: the optimizer update runs only in the taken
  branch, in place in the donated state, and a finite step never pays for reading the old
  state a second time (a ``jnp.where`` over parameters and moments cost ~0.2 s of a 3 s
  C-Tran-R101 CPU step, benchmarks/step_breakdown.py).
  """
  kept = jax.lax.cond(finite, lambda _: compute_new(), lambda _: old, None)
  bad = jnp.logical_not(finite).astype(jnp.int32)
  health = {"nonfinite_steps": health["nonfinite_steps"] + bad,
            "consecutive": jnp.where(finite, 0, health["consecutive"] + 1),
            "first_bad_step": jnp.where((health["first_bad_step"] < 0) & (bad > 0), step,
                                        health["first_bad_step"])}
  return kept, health


class Health:
  """Host side of the counters: the policy, and the example ids of recent steps."""

  def __init__(self, config):
    check_choice("nan_policy", config.nan_policy, NAN_POLICIES)
    limit = config.max_consecutive_nonfinite
    if not isinstance(limit, int) or limit < 1:
      raise ValueError(f"config.max_consecutive_nonfinite={limit!r}; expected a positive "
                       "integer")
    self.policy, self.limit = config.nan_policy, limit
    self._ids = collections.OrderedDict()  # step -> example ids, since the last check
    self.reported = 0

  def record(self, step: int, example_ids) -> None:
    self._ids[step] = example_ids

  def check(self, state, *, last_checkpoint: str | None) -> None:
    """Raise FloatingPointError when the policy says stop; log new skips otherwise."""
    health = jax.device_get(state["health"])
    total, consecutive = int(health["nonfinite_steps"]), int(health["consecutive"])
    first = int(health["first_bad_step"])
    ids = self._ids.get(first)
    self._ids.clear()
    if total == 0:
      return
    where = (f"last good checkpoint: {last_checkpoint}" if last_checkpoint
             else "no checkpoint was saved yet")
    examples = (f" (example ids {', '.join(str(i) for i in list(ids)[:8])}"
                f"{', ...' if len(ids) > 8 else ''})" if ids is not None else "")
    advice = ("lower config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, "
              "or check the data")
    if self.policy == "stop":
      raise FloatingPointError(
          f"the loss or gradient became non-finite at step {first + 1}{examples}; that "
          f"update was not applied and nothing non-finite was saved; {where}; {advice} "
          "(config.nan_policy='skip' skips such steps)")
    if consecutive > self.limit:
      raise FloatingPointError(
          f"{consecutive} non-finite steps in a row (more than "
          f"config.max_consecutive_nonfinite={self.limit}); {total} skipped in all, the "
          f"first at step {first + 1}{examples}; {where}; {advice}")
    if total > self.reported:
      logging.warning("skipped %d non-finite step(s) so far (the first at step %d%s)",
                      total, first + 1, examples)
      self.reported = total


def all_finite(tree) -> jax.Array:
  """One scalar: every floating leaf of `tree` is finite (checked before each save)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# ----------------------------------------------------------------------------- resuming

# Settings that change what a run computes from a given checkpoint on: a resume with any of
# them changed is refused (start a new workdir instead). Everything else (evaluation,
# logging and checkpoint frequency, mesh, data_dir, prefetch, ...) may change freely.
TRAJECTORY_KEYS = ("seed", "batch_size", "grad_accum_steps", "num_train_steps", "num_epochs",
                   "optimizer", "schedule", "loss", "lmt", "ema.decay", "ema.warmup",
                   "nan_policy", "data.name",
                   "data.train_split", "data.transform", "data.image_size", "data.scale_size",
                   "data.crop_sizes", "data.flip", "data.mean", "data.std",
                   "data.randaugment_n", "data.randaugment_m", "data.cutout",
                   "data.cutout_size", "data.resize_on_device", "data.on_bad_example",
                   "model.bn_mode", "model.dtype", "model.init_from")


def trajectory_settings(config) -> dict:
  """``{dotted key: value}`` of `TRAJECTORY_KEYS` (JSON-comparable)."""
  out = {}
  for key in TRAJECTORY_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]
    flat = {key: node} if not hasattr(node, "items") else {
        f"{key}.{k}": v for k, v in flatten(node).items()}
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})
  return out


def flatten(node, prefix=""):
  """``{"a.b": value}`` of a nested config (or dict)."""
  out = {}
  for key, value in node.items():
    if hasattr(value, "items"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_settings(stored: dict, current: dict) -> list[str]:
  """``key: checkpoint has X, config has Y`` for each differing trajectory setting."""
  return [f"{k}: checkpoint has {stored.get(k)!r}, config has {current.get(k)!r}"
          for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
