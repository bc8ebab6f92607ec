"""Training checkpoints: a thin orbax wrapper that refuses to restore into the wrong model.

Layout under the workdir::

  checkpoints/<step>/{state,meta}   the last `keep` saves (async, every N steps and at the end)
  best/<step>/{state,meta}          the save with the best validation metric so far

``state`` is the array pytree (params, BatchNorm statistics, optimizer state, step);
``meta`` is JSON: the model config, label count and names, seed, data position and host-side
schedule state, which is everything else a resumed run needs. Before any array is read, the
stored model config is compared with the current one, so a checkpoint from another model or
label count fails with a message that lists the differences instead of a shape error.

Multi-process runs: every process calls `Checkpoints.save` and `restore` in the same order
(orbax synchronises them; process 0 writes the metadata and each process the shards of the
arrays it holds), so the workdir must be storage that all processes see. Nothing here
writes files itself. A checkpoint restores onto whatever shardings the target state
carries: another mesh, FSDP layout or process count than the one that saved it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "ctran_jax/train_state/v2"


class CheckpointError(ValueError):
  """A checkpoint cannot be used: missing, or from a different model / label set."""


def _manager(directory: str, keep: int, asynchronous: bool, name: str) -> ocp.CheckpointManager:
  # Its own barrier names: with several processes, the async saves of two managers at the
  # same step otherwise meet in one barrier ("Barrier ... is already ongoing").
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
  # cleanup_tmp_directories: a save killed half-way leaves a temporary directory (never
  # taken as a checkpoint: orbax commits by renaming it); remove it at the next start.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=asynchronous,
                                         multiprocessing_options=multiprocessing,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads: creates no directory and deletes nothing."""
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def model_mismatch(stored: dict, current: dict) -> list[str]:
  """Human-readable differences between two model configs (empty when compatible)."""
  keys = sorted(set(stored) | set(current))
  return [f"{k}: checkpoint has {stored.get(k)!r}, config has {current.get(k)!r}"
          for k in keys if stored.get(k) != current.get(k)]


def storage_error(error: BaseException, what: str) -> CheckpointError:
  """A one-line error for a failed write: what, and the innermost cause (e.g. "No space
  left on device: '/run/checkpoints/...'")."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    if isinstance(cause, OSError):
      break
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, OSError) and cause.strerror:
    reason = cause.strerror + (f": {cause.filename!r}" if cause.filename else "")
  else:
    reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
  return CheckpointError(f"{what} failed ({reason}); the previous checkpoints are intact")


class Checkpoints:
  """Latest-K and best checkpoints of one training run."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"config.keep_checkpoints={keep!r}; expected a positive integer")
    self.workdir = workdir
    try:
      self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, asynchronous, "latest")
      self.best = _manager(os.path.join(workdir, "best"), 1, asynchronous, "best")
    except OSError as e:
      raise storage_error(e, f"creating the checkpoint directories in {workdir}") from None

  def save(self, step: int, state, meta: dict, *, best: bool = False) -> None:
    """Save asynchronously (all processes must call); `best` also replaces the best copy.

    A failure of the previous background save (disk full, storage gone) surfaces here or
    in `wait` as one `CheckpointError`.
    """
    meta = {"format": FORMAT, "step": int(step), **meta}
    for manager in (self.latest, self.best) if best else (self.latest,):
      if manager.latest_step() == step:
        continue
      try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
      except Exception as e:  # noqa: BLE001 - orbax wraps storage errors in many types
        raise storage_error(e, f"saving checkpoint {step} to {manager.directory}") from e

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def steps(self) -> list[int]:
    """The complete (committed) steps of ``checkpoints/``, newest first."""
    return sorted(self.latest.all_steps(), reverse=True)

  def restore_newest_usable(self, target_state, *, model_config: dict, num_labels: int,
                            check_meta=None):
    """``(state, meta, step)`` of the newest checkpoint that reads, or None when there is
    none.

    An unreadable one (a truncated or missing file) is reported in one line, moved to
    ``WORKDIR/corrupt/<step>`` so it is never read again, and the next older one is tried.
    A readable checkpoint that does not fit is an error, not corruption: one of another
    model or label count, of another format version, or one whose JSON ``check_meta(meta)``
    refuses (raising ValueError: e.g. a resume with changed settings).
    """
    for step in self.steps():
      directory = str(self.latest.directory)
      try:
        meta = read_meta(directory, step)
      except CheckpointError as e:
        if "is not a ctran_jax training checkpoint" in str(e):
          raise
        self._set_aside(step, str(e))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        state, meta = restore(directory, step, target_state, model_config=model_config,
                              num_labels=num_labels)
        return state, meta, step
      except CheckpointError as e:
        if "written by a different model" in str(e):
          raise
        self._set_aside(step, str(e).splitlines()[0])
    return None

  def _set_aside(self, step: int, reason: str) -> None:
    from absl import logging

    source = os.path.join(str(self.latest.directory), str(step))
    target = os.path.join(self.workdir, "corrupt", str(step))
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(source, target)
    logging.warning("checkpoint %d is unreadable, moved to %s (%s); trying an older one",
                    step, target, reason[:300])
    self.latest.reload()

  def wait(self) -> None:
    for manager in (self.latest, self.best):
      try:
        manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001 - as in save
        raise storage_error(e, f"saving a checkpoint to {manager.directory}") from e

  def close(self) -> None:
    """Wait for the saves in flight and release the managers (errors are not raised: a
    failed save was already reported by `save` or `wait`)."""
    for manager in (self.latest, self.best):
      try:
        manager.close()
      except Exception:  # noqa: BLE001 - closing after a failed save must not mask it
        pass

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def resolve(workdir: str, which: str) -> tuple[str, int]:
  """(manager directory, step) for ``latest``, ``best`` or a path to a step directory."""
  if which in ("latest", "best"):
    directory = os.path.join(workdir, "checkpoints" if which == "latest" else "best")
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if not steps:
      raise CheckpointError(f"no {which} checkpoint in {directory}: train first "
                            f"(python -m ctran_jax.main --mode=train --workdir={workdir} ...)")
    return directory, max(steps)
  path = os.path.abspath(which.rstrip("/"))
  name = os.path.basename(path)
  if not (os.path.isdir(path) and name.isdigit()):
    raise CheckpointError(f"--checkpoint={which!r} is not 'latest', 'best' or a checkpoint step "
                          f"directory such as {os.path.join(workdir, 'checkpoints', '1000')}")
  return os.path.dirname(path), int(name)


def read_meta(directory: str, step: int) -> dict:
  """The JSON side of a checkpoint (cheap: no arrays are read)."""
  manager = _reader(directory)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable dirs
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot read checkpoint {directory}/{step}: {first}") from e
  finally:
    manager.close()
  found = meta.get("format") if isinstance(meta, dict) else None
  if found != FORMAT:
    raise CheckpointError(f"{directory}/{step} is not a ctran_jax training checkpoint of this "
                          f"version (format {found!r}, expected {FORMAT!r}); train it again "
                          "in a new --workdir")
  return meta


def restore(directory: str, step: int, target_state, *, model_config: dict,
            num_labels: int) -> tuple[object, dict]:
  """Restore ``(state, meta)`` onto `target_state`'s structure and shardings.

  Raises `CheckpointError` when the checkpoint belongs to another model or label count.
  The arrays are read straight into `target_state`'s shardings (each process reads the
  shards its devices hold), so the saving run's mesh and process count do not matter.
  """
  meta = read_meta(directory, step)
  problems = model_mismatch(meta.get("model", {}), model_config)
  if meta.get("num_labels") != num_labels:
    problems.insert(0, f"num_labels: checkpoint has {meta.get('num_labels')}, "
                       f"dataset has {num_labels}")
  if problems:
    raise CheckpointError(f"checkpoint {directory}/{step} was written by a different model:\n  "
                          + "\n  ".join(problems)
                          + "\nUse a fresh --workdir, or the config that wrote it.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  manager = _reader(directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"checkpoint {directory}/{step} is unreadable or does not fit the "
                          f"model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from e
  except Exception as e:  # noqa: BLE001 - truncated files raise from deep inside orbax/TS
    raise CheckpointError(f"checkpoint {directory}/{step} is unreadable: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e
  finally:
    manager.close()
  return restored, meta


def restore_weights(directory: str, step: int) -> tuple[dict, dict]:
  """``({"params": ..., "batch_stats": ...}, meta)`` of a checkpoint, without knowing the
  optimizer that wrote it: the whole state is read as host arrays by its stored layout.
  The EMA weights when the run kept them (what evaluation reported), else the trained ones.
  """
  meta = read_meta(directory, step)
  manager = _reader(directory)
  try:
    layout = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), layout,
                          is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged checkpoints
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot read checkpoint {directory}/{step}: {first}") from e
  finally:
    manager.close()
  source = state["ema"] if "ema" in state else state
  weights = {k: _pure(source[k]) for k in ("params", "batch_stats")}
  return weights, meta


def _pure(tree):
  """A restored nnx.State as ``nnx.to_pure_dict`` gives it: each variable's ``{"value": x}``
  level removed, list indices (stored as strings) back to ints."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return np.asarray(tree["value"])
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _pure(v)
            for k, v in tree.items()}
  return np.asarray(tree)
