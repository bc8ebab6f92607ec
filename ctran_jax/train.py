"""The trainer: label-mask training of C-Tran on a device mesh, with evaluation and checkpoints.

Sections, in the order they appear: config checks → model and optimizer → train state →
train step → the loop (`train_and_evaluate`: mesh → data → model → evaluator → state,
fresh or restored → loop: log, evaluate, checkpoint) → `evaluate_checkpoint`.

The step is one pure `jax.jit` function over a ``(data, fsdp)`` `Mesh` with explicit in/out
shardings (batch split over every device, parameters and optimizer state split over
``fsdp`` by the rule in `sharding`); the model is rebuilt inside it from its `ModelDef`.
The train state is made the big_vision way: one ``init()``, its abstract shape from
`jax.eval_shape` (also the restore target), and ``jax.jit(init, out_shardings=...)`` to
initialise it straight into its shardings. Multi-process runs need no other code path:
every process runs this same loop on its own data shard (main.py initialises
`jax.distributed`). Each config section is checked by the module that reads it
(`sharding`, `pipeline`, `model_store`, `losses`, `label_mask`, `evaluate`, `checkpoint`);
`check_config` has the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax import nnx
from jax.experimental import multihost_utils

from ctran_jax import (
  augment,
  checkpoint,
  console,
  ema,
  evaluate,
  host_memory,
  label_mask,
  losses,
  model_store,
  resilience,
  sharding,
)
from ctran_jax.config_util import check_choice
from ctran_jax.data import pipeline

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "plateau", "cosine", "onecycle")
DECAY_MASKS = ("kernels", "all")


# ----------------------------------------------------------------------------- config checks

def check_config(config: ml_collections.ConfigDict) -> None:
  """The trainer's own keys (loop lengths and batch layout), which no other module reads."""
  for key in ("batch_size", "grad_accum_steps", "log_every_steps", "checkpoint_every_steps"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"config.{key}={config[key]!r}; expected a positive integer")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_train_steps or config.num_epochs to a positive value")
  if config.eval_every_steps < 0:
    raise ValueError(f"config.eval_every_steps={config.eval_every_steps}; expected >= 0 "
                     "(0: once per epoch)")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")


# ----------------------------------------------------------------------------- model, optimizer

def model_from_config(config, num_labels: int) -> model_store.ModelDef:
  """The configured C-Tran's `ModelDef`; a bad ``config.model`` value is an error naming it."""
  m = config.model
  try:
    return model_store.ModelDef.build(model_store.describe_ctran(m, num_labels),
                                      seed=config.seed, bn_mode=m.bn_mode, dtype=m.dtype,
                                      remat=m.remat)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from None


def learning_rate_schedule(config, num_train_steps: int) -> optax.Schedule:
  """Warm-up then constant (constant, plateau) or cosine decay to end_fraction * lr; or
  one-cycle (`optax.cosine_onecycle_schedule`, torch's OneCycleLR with cosine annealing):
  over num_train_steps, cosine from lr / div_factor up to lr (optimizer.learning_rate) in
  the first pct_start of the steps, then cosine down to lr / (div_factor *
  final_div_factor). One-cycle has its own warm-up: schedule.warmup_steps is not used."""
  s = config.schedule
  check_choice("schedule.name", s.name, SCHEDULES)
  lr, warmup = config.optimizer.learning_rate, s.warmup_steps
  if s.name == "onecycle":
    if not 0 < s.pct_start < 1 or s.div_factor < 1 or s.final_div_factor < 1:
      raise ValueError(f"config.schedule: onecycle needs 0 < pct_start < 1, div_factor >= 1 "
                       f"and final_div_factor >= 1, got pct_start={s.pct_start}, "
                       f"div_factor={s.div_factor}, final_div_factor={s.final_div_factor}")
    return optax.cosine_onecycle_schedule(max(num_train_steps, 2), lr, s.pct_start,
                                          s.div_factor, s.final_div_factor)
  if s.name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(num_train_steps, warmup + 1), end_value=lr * s.end_fraction)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def kernel_mask(params):
  """True for the leaves weight decay applies to under ``optimizer.decay_mask="kernels"``:
  the ``kernel`` of every Conv / Linear layer (and of the label-wise head); False for
  biases, norm scales, embeddings (label and state tables) and anything else."""
  def is_kernel(path, _):
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    if names and names[-1] == "value":  # an nnx.Variable's own leaf
      names = names[:-1]
    return bool(names) and names[-1] == "kernel"

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config, num_train_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule): Adam (reference: no weight decay), AdamW, or SGD with momentum;
  optional clipping. Weight decay for adam/sgd is the coupled L2 of torch's optimizers;
  adamw's is decoupled. ``optimizer.decay_mask`` says which parameters decay, for all
  three: "kernels" (`kernel_mask`: Conv/Linear kernels only) or "all" (torch's
  ``weight_decay`` over ``model.parameters()``)."""
  o = config.optimizer
  check_choice("optimizer.name", o.name, OPTIMIZERS)
  check_choice("optimizer.decay_mask", o.decay_mask, DECAY_MASKS)
  if o.learning_rate <= 0:
    raise ValueError(f"config.optimizer.learning_rate={o.learning_rate}; expected > 0")
  schedule = learning_rate_schedule(config, num_train_steps)
  mask = kernel_mask if o.decay_mask == "kernels" else None
  if o.name == "adam":
    base = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.weight_decay:
      base = optax.chain(optax.add_decayed_weights(o.weight_decay, mask), base)
  elif o.name == "adamw":
    base = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=mask)
  else:
    base = optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                       optax.sgd(schedule, momentum=o.momentum))
  if o.grad_clip_norm:
    base = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), base)
  return base, schedule


@dataclasses.dataclass
class Plateau:
  """Reduce-on-plateau on the validation loss, held on the host (torch's defaults).

  The scale multiplies the optimizer's update; it is checkpointed in the JSON metadata.
  """
  factor: float = 0.1
  patience: int = 5
  threshold: float = 1e-4
  best: float = math.inf
  bad_evals: int = 0
  scale: float = 1.0

  def update(self, value: float) -> bool:
    """Record one validation loss; True when the learning rate was just reduced."""
    if value < self.best * (1 - self.threshold):
      self.best, self.bad_evals = value, 0
      return False
    self.bad_evals += 1
    if self.bad_evals > self.patience:
      self.scale *= self.factor
      self.bad_evals = 0
      return True
    return False


# ----------------------------------------------------------------------------- train state

def pretrained_weights(config) -> tuple[str, dict] | None:
  """``config.model.init_from``: (the stored model's kind, its weights as host arrays)."""
  if not config.model.init_from:
    return None
  description = model_store.read_description(config.model.init_from)
  return description["kind"], model_store.load_weights(config.model.init_from, description)


def train_state(config, mesh, model_def: model_store.ModelDef, tx):
  """(abstract state, init): the train state's shapes and shardings, and a function that
  initialises it on the mesh (from ``config.model.init_from`` when set).

  The state is ``{"params", "batch_stats", "opt_state", "step", "health"}`` (+ ``"ema"``
  with ``config.ema.decay`` > 0, see `ema`), split over ``fsdp`` by
  `sharding.state_shardings`; the abstract state (ShapeDtypeStructs carrying their
  shardings) is also the target of a checkpoint restore, so resuming initialises nothing.
  """
  def init(weights, kind=None):
    model = model_def.make()
    if weights is not None:  # a C-Tran's weights, or only its backbone's
      target = model if kind == "ctran" else model.backbone
      weights_state = nnx.state(target, model_store.WEIGHTS)
      nnx.replace_by_pure_dict(weights_state, weights)
      nnx.update(target, weights_state)
    params, batch_stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "health": resilience.initial_health()}
    if ema.enabled(config):
      state["ema"] = ema.initial(params, batch_stats)
    return state

  shapes = jax.eval_shape(init, None)
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=where),
                          shapes, shardings)
  jitted = jax.jit(init, out_shardings=shardings, static_argnames="kind")

  def initialise():
    pretrained = pretrained_weights(config)
    try:
      if pretrained is None:
        return jitted(None)
      kind, weights = pretrained
      return jitted(weights, kind=kind)
    except (ValueError, KeyError, TypeError) as e:
      if pretrained is None:
        raise
      raise ValueError(f"config.model.init_from={config.model.init_from!r} does not fit "
                       f"the configured model: {e}") from None

  return abstract, initialise


# ----------------------------------------------------------------------------- train step

def make_train_step(model_def: model_store.ModelDef, loss: losses.MaskedBCE, tx, schedule, *,
                    seed: int, accum_steps: int, finish_images=None, ema_decay: float = 0.0,
                    ema_warmup: bool = True):
  """(state, batch, lr_scale) -> (state, metrics); batch has image/labels/states.

  ``finish_images(batch) -> images``, when given, turns the batch's raw image fields into
  model inputs inside the step (``data.resize_on_device``: `augment.resize_windows`).
  Dropout is keyed by (seed, step).

  With ``accum_steps`` > 1 the batch is cut into micro-batches (rows i*k + j form micro-batch
  j, so each stays spread over all devices) whose gradients are summed; the loss is defined
  on the whole batch, so the update equals the unaccumulated one except for BatchNorm's
  per-micro-batch statistics (as in the reference, which steps every `grad_ac_steps` batches).
  """
  def micro_loss(params, batch_stats, micro, key, denominator):
    model = model_def.merge(params, batch_stats, key)
    model.train()
    images = finish_images(micro) if finish_images else micro["image"]

    def loss_fn(model):
      logits = model(images, micro["states"])
      return loss.total(logits, micro["labels"], micro["states"]) / denominator

    value, grads = nnx.value_and_grad(loss_fn)(model)
    return value, grads, nnx.state(model, nnx.BatchStat)

  def train_step(state, batch, lr_scale):
    step = state["step"]
    # A copy of the incoming state's structure: merging it into the model lets BatchNorm
    # overwrite the variables in place, and a skipped step must return the values before.
    old = jax.tree.map(lambda x: x, {k: state[k] for k in ("params", "batch_stats",
                                                           "opt_state", "ema") if k in state})
    key = jax.random.fold_in(jax.random.key(seed), step)
    in_loss = jnp.sum(loss.weights(batch["states"]))
    denominator = (jnp.float32(1.0) if loss.reduction == "sum"
                   else jnp.maximum(in_loss, 1).astype(jnp.float32))
    params, batch_stats = state["params"], state["batch_stats"]
    if accum_steps == 1:
      value, grads, batch_stats = micro_loss(params, batch_stats, batch, key, denominator)
    else:
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum_steps, accum_steps,
                                           *x.shape[1:]), 1, 0), batch)

      def body(carry, inputs):
        # params ride in the carry: NNX refuses variables from an outer trace.
        value_sum, grad_sum, batch_stats, params = carry
        index, micro_batch = inputs
        value, grads, batch_stats = micro_loss(params, batch_stats, micro_batch,
                                               jax.random.fold_in(key, index), denominator)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (value_sum + value, grad_sum, batch_stats, params), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (value, grads, batch_stats, _), _ = jax.lax.scan(
          body, (jnp.float32(0.0), zeros, batch_stats, params),
          (jnp.arange(accum_steps), micro))
    grad_norm = optax.tree.norm(grads)

    def updated():
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      updates = jax.tree.map(lambda u: u * lr_scale, updates)
      new = {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats,
             "opt_state": opt_state}
      if "ema" in state:
        new["ema"] = ema.update(old["ema"], new["params"], batch_stats, step,
                                decay=ema_decay, warmup=ema_warmup)
      return new

    # A step with a non-finite loss or gradient changes nothing but the counters.
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    kept, health = resilience.guarded_update(finite, step, updated, old, state["health"])
    new_state = {**kept, "step": step + 1, "health": health}
    metrics = {"loss": value, "bce_per_entry": value * denominator / jnp.maximum(in_loss, 1),
               "grad_norm": grad_norm, "lr": schedule(step) * lr_scale,
               "finite": finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def jit_train_step(config, model_def: model_store.ModelDef, tx, schedule, mesh, abstract_state):
  """The compiled step of `make_train_step` for ``config`` on `mesh`.

  `abstract_state` (from `train_state`) carries the state's shardings: the state keeps its
  FSDP layout across steps and is donated, the batch is split over all devices, the
  learning-rate scale and metrics are replicated.
  """
  finish_images = None
  if config.data.resize_on_device:
    data, dtype = config.data, jnp.dtype(config.model.dtype)
    finish_images = lambda batch: augment.resize_windows(  # noqa: E731
        batch["image"], batch["window"], batch["flip"], size=data.image_size, mean=data.mean,
        std=data.std, dtype=dtype)
  step = make_train_step(model_def, losses.from_config(config.loss), tx, schedule,
                         seed=config.seed, accum_steps=config.grad_accum_steps,
                         finish_images=finish_images, ema_decay=config.ema.decay,
                         ema_warmup=config.ema.warmup)
  state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------- the loop

def open_data(config) -> pipeline.DataSource:
  """`pipeline.open_source`; with several processes, process 0 prepares the data first.

  On shared storage the others then find a generated dataset ready instead of racing to
  write it; on per-host disks each prepares its own copy after process 0.
  """
  if jax.process_count() == 1:
    return pipeline.open_source(config.data)
  source = error = None
  if jax.process_index() == 0:
    try:
      source = pipeline.open_source(config.data)
    except Exception as e:  # noqa: BLE001 - re-raised after the barrier, so no one hangs
      error = e
  multihost_utils.sync_global_devices("ctran_jax.train.open_data")
  if error is not None:
    raise error
  return source or pipeline.open_source(config.data)


def tensorboard_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard scalars from process 0 only; the console gets concise log lines instead."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def total_train_steps(config, train_size: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, math.ceil(config.num_epochs * train_size / config.batch_size))


def model_summary(description: dict) -> str:
  """One line for the console: backbone and encoder sizes."""
  d = description
  if d.get("backbone") == "resnet":
    depth = (f"ResNet-{d['backbone_depth']}" if d["backbone_depth"] else
             f"ResNet {d['backbone_width']}-wide "
             f"{'-'.join(map(str, d['backbone_stage_sizes']))} {d['backbone_block']}")
  else:
    depth = "Inception-v3"
  return (f"C-Tran, {depth} backbone, hidden {d['hidden']}, {d['layers']} layers x "
          f"{d['heads']} heads, {'LMT' if d['use_lmt'] else 'no LMT'}")


class Pace:
  """Steps/s and ETA over training time only: the first step (compilation) and the
  evaluations and saves between steps (`paused`) are left out."""

  def __init__(self, step: int):
    self._step, self._time, self._paused = step, time.perf_counter(), 0.0
    self.compile_seconds = None
    self._noted = False

  def compiled(self, _, step: int) -> None:
    """The first step's results are ready: it took the compilation time."""
    now = time.perf_counter()
    self.compile_seconds = now - self._time
    self._step, self._time, self._paused = step, now, 0.0

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def steps_per_second(self, step: int) -> float:
    """Since the last call (0 when no step was timed yet)."""
    now = time.perf_counter()
    seconds = now - self._time - self._paused
    rate = (step - self._step) / seconds if step > self._step and seconds > 0 else 0.0
    self._step, self._time, self._paused = step, now, 0.0
    return rate

  def compile_note(self) -> str:
    """On the first progress line: how long the first step (compilation) took."""
    if self._noted or self.compile_seconds is None:
      return ""
    self._noted = True
    return f"  (first step, compilation included: {self.compile_seconds:.1f} s)"


def log_progress(writer, pending: list, done: int, num_steps: int, pace: Pace, config,
                 skipped_examples: int = 0) -> dict:
  """The progress line and TensorBoard scalars of the steps since the last one
  (`skipped_examples`: unreadable training examples dropped so far, data.on_bad_example)."""
  values = jax.device_get(pending)
  finite = [m for m in values if m["finite"]] or values
  summary = {k: float(np.mean([m[k] for m in finite])) for k in finite[0] if k != "finite"}
  summary["lr"] = float(values[-1]["lr"])
  summary["nonfinite_steps"] = float(sum(1 for m in values if not m["finite"]))
  steps_per_s = pace.steps_per_second(done)
  summary.update(steps_per_sec=steps_per_s, examples_per_sec=steps_per_s * config.batch_size,
                 skipped_examples=float(skipped_examples))
  writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
  logging.info("step %*d/%d  loss %.4f  lr %.2e  grad %.3f  %s  ETA %s%s%s",
               len(str(num_steps)), done, num_steps, summary["loss"], summary["lr"],
               summary["grad_norm"],
               f"{steps_per_s:.1f} steps/s" if steps_per_s else "-- steps/s",
               console.format_seconds((num_steps - done) / steps_per_s) if steps_per_s
               else "--", f"  {skipped_examples} unreadable examples skipped"
               if skipped_examples else "", pace.compile_note())
  return {"step": done, **summary}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from the workdir's latest checkpoint) and evaluate.

  Returns ``{"reports": {split: report}, "train_log": [{"step": ..., "loss": ...}, ...],
  "state": final train state}``: the final evaluation (as in ``eval/results.json``), the
  logged training summaries and the (sharded) arrays of the last step. After a stop
  request (SIGTERM, Ctrl-C: see `resilience.StopRequest`) it returns early with
  ``"stopped": signal name, "step": the saved step`` and empty reports.
  """
  check_config(config)
  writer = tensorboard_writer(workdir)

  # --- Mesh and data.
  mesh = sharding.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
  local_batch = sharding.local_batch_size(config.batch_size, mesh)
  if (config.batch_size // config.grad_accum_steps) % mesh.devices.size:
    raise ValueError(f"micro-batch {config.batch_size // config.grad_accum_steps} "
                     f"(batch_size / grad_accum_steps) must be divisible by the "
                     f"{mesh.devices.size} devices")
  source = open_data(config)
  meta = source.meta
  train_size = meta.split_sizes[config.data.train_split]
  num_steps = total_train_steps(config, train_size)
  steps_per_epoch = max(1, train_size // config.batch_size)
  eval_every = config.eval_every_steps or steps_per_epoch
  sizes = ", ".join(f"{k} {v}" for k, v in meta.split_sizes.items())
  logging.info("dataset  %s: %d labels; %s", meta.name, meta.num_labels, sizes)
  devices = mesh.devices.flat[0]
  logging.info("devices  %d %s device(s) in %d process(es), mesh %s; batch %d; %d steps "
               "(%.1f epochs)", mesh.devices.size, devices.platform, jax.process_count(),
               " ".join(f"{k}={v}" for k, v in mesh.shape.items()), config.batch_size,
               num_steps, num_steps / steps_per_epoch)

  # --- Model, optimizer, LMT states, evaluator: each checks its own config section.
  model_def = model_from_config(config, meta.num_labels)
  tx, schedule = make_optimizer(config, num_steps)
  ema.check_config(config.ema)
  states_for = label_mask.training_states(config)
  evaluator = evaluate.Evaluator(model_def, config, mesh, source, workdir=workdir,
                                 writer=writer)

  # --- Train state: restored from the latest checkpoint (auto-resume), or fresh.
  health = resilience.Health(config)
  abstract, init = train_state(config, mesh, model_def, tx)
  # The checkpoints are closed however the loop ends: an error must not leave a save
  # half-written by a background thread while the caller goes on.
  with checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints) as ckpts:
    plateau = Plateau(config.schedule.plateau_factor, config.schedule.plateau_patience)
    best_metric = -math.inf
    trajectory = resilience.trajectory_settings(config)
    had_checkpoints = bool(ckpts.steps())

    def same_run(stored: dict) -> None:
      changed = resilience.changed_settings(stored.get("trajectory", {}), trajectory)
      if changed:
        raise ValueError(f"{workdir} holds a run with other settings, so resuming it would "
                         "not continue that run: " + "; ".join(changed)
                         + ". Use the settings it was started with, or a new --workdir "
                         "(model.init_from=an exported model starts from its weights).")

    restored = ckpts.restore_newest_usable(abstract, model_config=model_def.description,
                                           num_labels=meta.num_labels, check_meta=same_run)
    if restored is not None:
      state, ckpt_meta, step = restored
      plateau = Plateau(**ckpt_meta["plateau"])
      best_metric = ckpt_meta["best_metric"]
      evaluate.truncate_history(workdir, step)  # evaluations after it will be redone
      logging.info("resumed  from checkpoint %d in %s", step, ckpts.latest.directory)
    elif had_checkpoints:
      raise checkpoint.CheckpointError(
          f"no checkpoint in {workdir}/checkpoints could be read (moved to {workdir}/corrupt); "
          "remove them to start afresh in this workdir, or use a new --workdir")
    else:
      state = init()
    # The initialiser's temporaries and executable are garbage now; keep them out of the
    # peak RSS that the train step's buffers add to (CPU).
    host_memory.release(drop_compiled=True)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("model    %s: %s parameters", model_summary(model_def.description),
                 f"{num_params:,}")
    start_step = int(state["step"])

    def checkpoint_meta():
      return {"model": model_def.description, "num_labels": meta.num_labels,
              "label_names": list(meta.label_names), "dataset": meta.name,
              "transform": pipeline.eval_transform_spec(config.data), "seed": config.seed,
              "data_position": {"examples_seen": int(state["step"]) * config.batch_size,
                                "batch_size": config.batch_size},
              "plateau": dataclasses.asdict(plateau), "best_metric": best_metric,
              "trajectory": trajectory, "skipped_examples": skipped_examples}

    def save(step: int, best: bool) -> None:
      """A checkpoint of a state checked finite (never a non-finite one)."""
      health.check(state, last_checkpoint=last_saved)
      if not bool(check_finite(state["params"])):
        raise FloatingPointError(f"the parameters are not finite at step {step}; not saving "
                                 f"them (last good checkpoint: {last_saved})")
      start = time.perf_counter()
      ckpts.save(step, state, checkpoint_meta(), best=best)
      logging.info("saved    checkpoint %d%s in %.1f s (written in the background)", step,
                   ", the best so far," if best else "", time.perf_counter() - start)

    # --- Loop.
    train_step = jit_train_step(config, model_def, tx, schedule, mesh, abstract)
    train_iter = pipeline.train_dataset(
        source, batch_size=local_batch, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    check_finite = jax.jit(resilience.all_finite)
    last_saved = f"checkpoints/{start_step}" if restored is not None else None
    pending, train_log = [], []
    skipped_examples = ckpt_meta.get("skipped_examples", 0) if restored is not None else 0
    pace = Pace(start_step)
    if start_step >= num_steps:
      logging.info("training already complete at step %d; evaluating", start_step)
    with resilience.StopRequest() as stop:
      for step in range(start_step, num_steps):
        local = next(train_iter)
        skipped_examples += int(local["skipped"].sum()) if "skipped" in local else 0
        local["states"] = states_for(local["labels"], local["example_id"], step)
        health.record(step, local["example_id"])
        batch = sharding.global_batch(
            {k: local[k] for k in ("image", "labels", "states", "window", "flip") if k in local},
            mesh)
        state, metrics = train_step(state, batch, jnp.float32(plateau.scale))
        pending.append(metrics)
        done = step + 1
        if step == start_step:
          pace.compiled(jax.block_until_ready(metrics), done)
          host_memory.release()  # the compiler's heap

        if done % config.log_every_steps == 0 or done == num_steps:
          train_log.append(log_progress(writer, pending, done, num_steps, pace, config,
                                        skipped_examples))
          pending = []
          health.check(state, last_checkpoint=last_saved)

        if stop.should_stop(done):
          with pace.paused():
            save(done, best=False)
            ckpts.wait()
          logging.warning("stopped at step %d on %s: checkpoint %d saved; run the same command "
                          "to resume", done, stop.signal_name, done)
          writer.flush()
          ckpts.close()
          return {"reports": {}, "train_log": train_log, "state": state,
                  "stopped": stop.signal_name, "step": done}

        is_best = False
        if done % eval_every == 0 or done == num_steps:
          with pace.paused():  # evaluation time is not training speed
            report = evaluator.evaluate(state, config.data.eval_split, done)
          first = report["known"][evaluate.fraction_key(evaluator.fractions[0])]
          if config.schedule.name == "plateau" and plateau.update(first["loss"]):
            logging.info("validation loss plateaued: learning rate scale now %g", plateau.scale)
          selected = evaluator.selection_value(report)
          if selected > best_metric:
            best_metric, is_best = selected, True
        if done % config.checkpoint_every_steps == 0 or done == num_steps or is_best:
          with pace.paused():
            save(done, best=is_best)
            last_saved = f"checkpoints/{done}"

    # --- Final report on the evaluation and test splits.
    ckpts.wait()
    final_step = int(state["step"])
    reports = evaluator.final_report(state, final_step, f"checkpoints/{final_step}")
    writer.flush()
    ckpts.close()
    return {"reports": reports, "train_log": train_log, "state": state}


# ----------------------------------------------------------------------------- evaluation only

def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "latest") -> dict:
  """``--mode=eval``: evaluate a saved checkpoint on the evaluation and test splits."""
  writer = tensorboard_writer(workdir)
  directory, step = checkpoint.resolve(workdir, which)
  mesh = sharding.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
  source = open_data(config)
  model_def = model_from_config(config, source.meta.num_labels)
  evaluator = evaluate.Evaluator(model_def, config, mesh, source, workdir=workdir,
                                 writer=writer)
  num_steps = total_train_steps(config, source.meta.split_sizes[config.data.train_split])
  tx, _ = make_optimizer(config, num_steps)
  abstract, _ = train_state(config, mesh, model_def, tx)
  state, _ = checkpoint.restore(directory, step, abstract, num_labels=source.meta.num_labels,
                                model_config=model_def.description)
  label = os.path.relpath(os.path.join(directory, str(step)), workdir)
  reports = evaluator.final_report(state, step, label)
  writer.flush()
  return reports
