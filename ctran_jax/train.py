"""The trainer: label-mask training of C-Tran on a device mesh, with evaluation and checkpoints.

Reads top to bottom: config checks → optimizer → train state → step functions →
`train_and_evaluate` (mesh → data → model → restore → loop: log, evaluate, checkpoint).
The step is one pure `jax.jit` function over a ``(data, fsdp)`` `Mesh` with explicit in/out
shardings (batch split over every device, parameters and optimizer state split over
``fsdp`` by the rule in `sharding`); the model is split with `nnx.split` outside and merged
inside. Multi-process runs need no other code path: every process runs this same loop
on its own data shard (main.py initialises `jax.distributed`).
"""

from __future__ import annotations

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
from clu import metric_writers, periodic_actions
from flax import nnx
from jax.experimental import multihost_utils

from ctran_jax import augment, checkpoint, evaluate, label_mask, metrics, model_store, sharding
from ctran_jax.data import pipeline
from ctran_jax.losses import LOSS_LABELS, REDUCTIONS, loss_weights, masked_bce
from ctran_jax.models import BACKBONES
from ctran_jax.models.remat import CHOICES as REMAT_CHOICES
from ctran_jax.models.remat import set_remat

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "plateau", "cosine")
BN_MODES = ("train", "frozen")
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- config checks

def check_config(config: ml_collections.ConfigDict) -> None:
  """Reject values that would fail deep inside JAX, with the key and the accepted values."""
  def one_of(key, value, allowed):
    if value not in allowed:
      raise ValueError(f"config.{key}={value!r}; expected one of {', '.join(allowed)}")

  one_of("optimizer.name", config.optimizer.name, OPTIMIZERS)
  one_of("schedule.name", config.schedule.name, SCHEDULES)
  one_of("loss.reduction", config.loss.reduction, REDUCTIONS)
  one_of("loss.labels", config.loss.labels, LOSS_LABELS)
  one_of("model.bn_mode", config.model.bn_mode, BN_MODES)
  one_of("model.dtype", config.model.dtype, DTYPES)
  one_of("model.backbone", config.model.backbone, BACKBONES)
  one_of("model.remat", config.model.remat, REMAT_CHOICES)
  one_of("data.transform", config.data.transform, pipeline.TRANSFORMS)
  one_of("eval.selection_metric", config.eval.selection_metric,
         metrics.METRIC_NAMES + metrics.CUB_METRIC_NAMES)
  if not isinstance(config.lmt.num_maskable, int) or config.lmt.num_maskable < 0:
    raise ValueError(f"config.lmt.num_maskable={config.lmt.num_maskable!r}; expected an "
                     "integer >= 0 (0: every label may be known)")
  if any(not isinstance(n, int) or n < 0 for n in config.eval.known_groups):
    raise ValueError(f"config.eval.known_groups={config.eval.known_groups!r}; expected "
                     "integers >= 0 (numbers of concept groups given as known)")
  if config.data.resize_on_device and config.data.transform != "ctran":
    raise ValueError("config.data.resize_on_device needs config.data.transform='ctran'")
  positive = ("batch_size", "grad_accum_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval.batch_size")
  for key in positive:
    value = config
    for part in key.split("."):
      value = value[part]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key}={value!r}; expected a positive integer")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_train_steps or config.num_epochs to a positive value")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")
  if not 0.0 <= config.lmt.all_unknown_fraction <= 1.0:
    raise ValueError(f"config.lmt.all_unknown_fraction={config.lmt.all_unknown_fraction}; "
                     "expected a value in [0, 1]")
  if not 0.0 <= config.lmt.max_known_fraction <= 1.0:
    raise ValueError(f"config.lmt.max_known_fraction={config.lmt.max_known_fraction}; "
                     "expected a value in [0, 1]")
  for f in config.eval.known_fractions:
    if not 0.0 <= f < 1.0:
      raise ValueError(f"config.eval.known_fractions has {f}; expected values in [0, 1)")
  if config.optimizer.learning_rate <= 0:
    raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate}; "
                     "expected > 0")
  fsdp = config.mesh.fsdp
  if not isinstance(fsdp, int) or (fsdp < 1 and fsdp != -1):
    raise ValueError(f"config.mesh.fsdp={fsdp!r}; expected -1 (all devices) or a positive "
                     "integer (1: pure data parallel)")
  if not isinstance(config.mesh.fsdp_min_size, int) or config.mesh.fsdp_min_size < 0:
    raise ValueError(f"config.mesh.fsdp_min_size={config.mesh.fsdp_min_size!r}; expected an "
                     "integer >= 0")


def model_kwargs(config: ml_collections.ConfigDict, num_labels: int) -> dict:
  """The `model_store` description of the configured model (also stored in checkpoints)."""
  m = config.model
  if m.backbone != "resnet":  # (ResNet checkpoints from before the key existed still match)
    return {"kind": "ctran", "num_labels": num_labels, "backbone": m.backbone,
            "hidden": m.hidden, "heads": m.heads, "layers": m.layers,
            "ffn_dim": m.ffn_dim or None, "dropout": m.dropout, "use_lmt": m.use_lmt,
            "train_unknown_state": m.train_unknown_state,
            "pos_emb": m.pos_emb, "image_tokens": m.image_tokens}
  return {"kind": "ctran", "num_labels": num_labels, "backbone_depth": m.backbone_depth,
          "backbone_width": m.backbone_width,
          "backbone_stage_sizes": tuple(m.backbone_stage_sizes) if m.backbone_depth == 0
          else None,
          "backbone_block": m.backbone_block if m.backbone_depth == 0 else None,
          "hidden": m.hidden, "heads": m.heads, "layers": m.layers,
          "ffn_dim": m.ffn_dim or None, "dropout": m.dropout, "use_lmt": m.use_lmt,
          "train_unknown_state": m.train_unknown_state,
          "pos_emb": m.pos_emb, "image_tokens": m.image_tokens}


def stored_model_config(kwargs: dict) -> dict:
  """JSON-comparable form of `model_kwargs` (tuples become lists, as JSON stores them)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


# ----------------------------------------------------------------------------- optimizer

def learning_rate_schedule(config, num_train_steps: int) -> optax.Schedule:
  """Warm-up then constant (constant, plateau) or cosine decay to end_fraction * lr."""
  lr, warmup = config.optimizer.learning_rate, config.schedule.warmup_steps
  if config.schedule.name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(num_train_steps, warmup + 1),
        end_value=lr * config.schedule.end_fraction)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (reference: no weight decay), AdamW, or SGD with momentum; optional clipping.

  Weight decay for adam/sgd is the coupled L2 of torch's optimizers; adamw's is decoupled.
  """
  o = config.optimizer
  if o.name == "adam":
    base = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.weight_decay:
      base = optax.chain(optax.add_decayed_weights(o.weight_decay), base)
  elif o.name == "adamw":
    base = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  else:
    base = optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.sgd(schedule, momentum=o.momentum))
  if o.grad_clip_norm:
    base = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), base)
  return base


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


# ----------------------------------------------------------------------------- step functions

def _reseed(rng_state, key):
  """Fresh dropout keys for this step: one per RNG variable, counts reset to 0."""
  leaves, treedef = jax.tree.flatten(rng_state)
  new = [jax.random.fold_in(key, i) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
         else jnp.zeros_like(x) for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, new)


def make_train_step(graphdef, tx, schedule, *, seed: int, reduction: str, accum_steps: int,
                    finish_images=None, labels_in_loss: str = "unknown"):
  """(state, rng_state, batch, lr_scale) -> (state, metrics); batch has image/labels/states.

  ``finish_images(batch) -> images``, when given, turns the batch's raw image fields into
  model inputs inside the step (``data.resize_on_device``: `augment.resize_windows`).

  With ``accum_steps`` > 1 the batch is cut into micro-batches (rows i*k + j form micro-batch
  j, so each stays spread over all devices) whose gradients are summed; the loss is defined
  on the whole batch, so the update equals the unaccumulated one except for BatchNorm's
  per-micro-batch statistics (as in the reference, which steps every `grad_ac_steps` batches).
  """
  def micro_loss(params, batch_stats, rng_state, micro, key, denominator):
    model = nnx.merge(graphdef, params, batch_stats, _reseed(rng_state, key))
    model.train()

    images = finish_images(micro) if finish_images else micro["image"]

    def loss_fn(model):
      logits = model(images, micro["states"])
      return masked_bce(logits, micro["labels"], micro["states"], reduction="sum",
                        labels_in_loss=labels_in_loss) / denominator

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, grads, nnx.state(model, nnx.BatchStat)

  def train_step(state, rng_state, batch, lr_scale):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(seed), step)
    in_loss = jnp.sum(loss_weights(batch["states"], labels_in_loss))
    denominator = (jnp.float32(1.0) if reduction == "sum"
                   else jnp.maximum(in_loss, 1).astype(jnp.float32))
    params, batch_stats = state["params"], state["batch_stats"]
    if accum_steps == 1:
      loss, grads, batch_stats = micro_loss(params, batch_stats, rng_state, batch, key,
                                            denominator)
    else:
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum_steps, accum_steps,
                                           *x.shape[1:]), 1, 0), batch)

      def body(carry, inputs):
        # params and rng_state ride in the carry: NNX refuses variables from an outer trace.
        loss_sum, grad_sum, batch_stats, params, rng_state = carry
        index, micro_batch = inputs
        loss, grads, batch_stats = micro_loss(params, batch_stats, rng_state, micro_batch,
                                              jax.random.fold_in(key, index), denominator)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, grad_sum, batch_stats, params, rng_state), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads, batch_stats, _, _), _ = jax.lax.scan(
          body, (jnp.float32(0.0), zeros, batch_stats, params, rng_state),
          (jnp.arange(accum_steps), micro))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    new_state = {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats,
                 "opt_state": opt_state, "step": step + 1}
    metrics = {"loss": loss, "bce_per_unknown": loss * denominator / jnp.maximum(in_loss, 1),
               "grad_norm": optax.tree.norm(grads), "lr": schedule(step) * lr_scale}
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- helpers

def model_overrides(config) -> dict:
  """Model settings that do not change the weights (not stored in checkpoints' model config)."""
  return {"bn_mode": config.model.bn_mode, "dtype": jnp.dtype(config.model.dtype)}


def create_model(config, num_labels: int):
  """A freshly initialised model, or one initialised from ``config.model.init_from``."""
  kwargs, overrides = model_kwargs(config, num_labels), model_overrides(config)
  model = model_store.init_model(kwargs, seed=config.seed, **overrides)
  if config.model.init_from:
    pretrained = model_store.load_model(config.model.init_from, **overrides)
    backbones = (model_store.ResNet, model_store.InceptionV3)
    target = model.backbone if isinstance(pretrained, backbones) else model
    try:
      nnx.update(target, nnx.state(pretrained, model_store.WEIGHTS))
    except Exception as e:  # noqa: BLE001 - nnx reports structure mismatches in many ways
      raise ValueError(f"config.model.init_from={config.model.init_from!r} does not fit the "
                       f"configured model: {e}") from e
    logging.info("initialised %s from %s", type(target).__name__, config.model.init_from)
  return model


def make_mesh(config):
  """The ``(data, fsdp)`` mesh of ``config.mesh``."""
  return sharding.make_mesh(config.mesh.num_devices, config.mesh.fsdp)


def state_shardings(config, mesh, state):
  """Where each leaf of the train state lives (`sharding.state_shardings`' FSDP rule)."""
  return sharding.state_shardings(state, mesh, config.mesh.fsdp_min_size)


def _train_state(config, model, num_labels: int, num_steps: int, make_opt_state):
  set_remat(model, config.model.remat)  # static: the graphdef carries it into the step
  graphdef, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  schedule = learning_rate_schedule(config, num_steps)
  tx = make_optimizer(config, schedule)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": make_opt_state(tx, params),
           "step": jnp.zeros((), jnp.int32)}
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("model: %s parameters, %s", f"{num_params:,}", model_kwargs(config, num_labels))
  return graphdef, state, rng_state, tx, schedule


def create_train_state(config, mesh, num_labels: int, num_steps: int):
  """(graphdef, state, rng_state, optimizer, schedule) of a fresh model, placed on the mesh.

  The state is split over ``fsdp`` by `state_shardings`; the RNG state is replicated.
  """
  graphdef, state, rng_state, tx, schedule = _train_state(
      config, create_model(config, num_labels), num_labels, num_steps,
      lambda tx, params: tx.init(params))
  state = sharding.put(state, state_shardings(config, mesh, state))
  return graphdef, state, sharding.replicate(rng_state, mesh), tx, schedule


def abstract_train_state(config, mesh, num_labels: int, num_steps: int):
  """As `create_train_state`, but the state is ShapeDtypeStructs with their shardings.

  The target of a checkpoint restore: nothing is initialised or compiled (initialising a
  ResNet-101 costs a compile of tens of seconds). The RNG state is real but its values do
  not matter: the train step replaces every key from (seed, step) and eval uses none.
  """
  model = model_store.build_model(model_kwargs(config, num_labels), seed=config.seed,
                                  **model_overrides(config))
  graphdef, state, rng_state, tx, schedule = _train_state(
      config, model, num_labels, num_steps, lambda tx, params: jax.eval_shape(tx.init, params))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
  state = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                       state, state_shardings(config, mesh, state))
  return graphdef, state, sharding.replicate(rng_state, mesh), tx, schedule


def image_finisher(config):
  """``data.resize_on_device``: the device half of the train transform, else None."""
  if not config.data.resize_on_device:
    return None
  data, dtype = config.data, jnp.dtype(config.model.dtype)
  return lambda batch: augment.resize_windows(
      batch["image"], batch["window"], batch["flip"], size=data.image_size, mean=data.mean,
      std=data.std, dtype=dtype)


def jit_train_step(config, graphdef, tx, schedule, mesh, state):
  """The compiled step of `make_train_step` with explicit in/out shardings on `mesh`.

  `state` (arrays or ShapeDtypeStructs) gives the train state's tree; the state keeps the
  FSDP layout across steps and is donated, the batch is split over all devices, the RNG
  state, learning-rate scale and metrics are replicated.
  """
  state_sh, repl = state_shardings(config, mesh, state), sharding.replicated(mesh)
  step = make_train_step(graphdef, tx, schedule, seed=config.seed,
                         reduction=config.loss.reduction, accum_steps=config.grad_accum_steps,
                         finish_images=image_finisher(config), labels_in_loss=config.loss.labels)
  return jax.jit(step, in_shardings=(state_sh, repl, sharding.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from the workdir's latest checkpoint) and evaluate.

  Returns ``{"reports": {split: report}, "train_log": [{"step": ..., "loss": ...}, ...],
  "state": final train state}``: the final evaluation (as in ``eval/results.json``), the
  logged training summaries and the (sharded) arrays of the last step.
  """
  check_config(config)
  is_chief = jax.process_index() == 0
  writer = tensorboard_writer(workdir)

  # --- Mesh and data.
  mesh = make_mesh(config)
  source = open_data(config)
  meta = source.meta
  num_labels = meta.num_labels
  train_size = meta.split_sizes[config.data.train_split]
  num_steps = total_train_steps(config, train_size)
  steps_per_epoch = max(1, train_size // config.batch_size)
  eval_every = config.eval_every_steps or steps_per_epoch
  local_batch = sharding.local_batch_size(config.batch_size, mesh)
  if (config.batch_size // config.grad_accum_steps) % mesh.devices.size:
    raise ValueError(f"micro-batch {config.batch_size // config.grad_accum_steps} "
                     f"(batch_size / grad_accum_steps) must be divisible by the "
                     f"{mesh.devices.size} devices")
  logging.info("dataset %s: %d labels, splits %s; %d devices in %d process(es), mesh %s, "
               "global batch %d (%d on this process), %d steps (%.1f epochs)", meta.name,
               num_labels, meta.split_sizes, mesh.devices.size, jax.process_count(),
               dict(mesh.shape), config.batch_size, local_batch, num_steps,
               num_steps / steps_per_epoch)

  # --- Model, optimizer, train state: fresh, or restored (auto-resume).
  kwargs = model_kwargs(config, num_labels)
  ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
  plateau = Plateau(config.schedule.plateau_factor, config.schedule.plateau_patience)
  best_metric = -math.inf
  resume = ckpts.latest_step() is not None
  graphdef, state, rng_state, tx, schedule = (abstract_train_state if resume else
                                              create_train_state)(config, mesh, num_labels,
                                                                  num_steps)
  if resume:
    directory, step = checkpoint.resolve(workdir, "latest")
    state, ckpt_meta = checkpoint.restore(
        directory, step, state, model_config=stored_model_config(kwargs), num_labels=num_labels)
    plateau = Plateau(**ckpt_meta["plateau"])
    best_metric = ckpt_meta.get("best_metric", -math.inf)
    logging.info("resumed from %s/%d", directory, step)
  start_step = int(state["step"])

  def checkpoint_meta():
    return {"model": stored_model_config(kwargs), "num_labels": num_labels,
            "label_names": list(meta.label_names), "seed": config.seed,
            "data_position": {"examples_seen": int(state["step"]) * config.batch_size,
                              "batch_size": config.batch_size},
            "plateau": dataclasses.asdict(plateau), "best_metric": best_metric}

  # --- Compiled steps.
  train_step = jit_train_step(config, graphdef, tx, schedule, mesh, state)
  evaluator = evaluate.Evaluator(graphdef, config, mesh, source)
  reports = {}  # split -> (step, report) of its latest evaluation

  def run_evaluation(split, step):
    if reports.get(split, (None,))[0] != step:
      report = evaluator.run(state, rng_state, split)
      evaluate.log_report(writer, report, step=step, split=split)
      evaluate.append_history(workdir, report, step=step, split=split)
      reports[split] = (step, report)
    return reports[split][1]

  # --- Loop.
  train_iter = pipeline.train_dataset(
      source, batch_size=local_batch, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  pending, last_log_time, last_log_step = [], time.perf_counter(), start_step
  train_log = []
  if start_step >= num_steps:
    logging.info("training already complete at step %d; evaluating", start_step)
  for step in range(start_step, num_steps):
    local = next(train_iter)
    local["states"] = (label_mask.train_states(
        local["labels"], local["example_id"], step=step, seed=config.seed,
        max_known_fraction=config.lmt.max_known_fraction,
        num_maskable=config.lmt.num_maskable,
        all_unknown_fraction=config.lmt.all_unknown_fraction) if config.model.use_lmt
        else np.full(local["labels"].shape, label_mask.UNKNOWN, np.int32))
    batch = sharding.global_batch(
        {k: local[k] for k in ("image", "labels", "states", "window", "flip") if k in local},
        mesh)
    state, metrics = train_step(state, rng_state, batch, jnp.float32(plateau.scale))
    pending.append(metrics)
    done = step + 1
    progress(done)

    if done % config.log_every_steps == 0 or done == num_steps:
      summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                 for k in pending[0]}
      summary["lr"] = float(pending[-1]["lr"])
      now = time.perf_counter()
      steps_per_s = (done - last_log_step) / (now - last_log_time)
      summary.update(steps_per_sec=steps_per_s, examples_per_sec=steps_per_s * config.batch_size)
      writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
      train_log.append({"step": done, **summary})
      logging.info("step %d/%d  loss %.4f  bce %.4f  lr %.2e  grad_norm %.3f  %.2f steps/s  "
                   "%.0f ex/s  ETA %s", done, num_steps, summary["loss"],
                   summary["bce_per_unknown"], summary["lr"], summary["grad_norm"],
                   steps_per_s, summary["examples_per_sec"],
                   _format_eta((num_steps - done) / max(steps_per_s, 1e-9)))
      if not math.isfinite(summary["loss"]):
        raise FloatingPointError(f"training loss became {summary['loss']} at step {done}; "
                                 "lower config.optimizer.learning_rate or enable "
                                 "config.optimizer.grad_clip_norm")
      pending, last_log_time, last_log_step = [], time.perf_counter(), done

    is_best = False
    if done % eval_every == 0 or done == num_steps:
      report = run_evaluation(config.data.eval_split, done)
      first = report["known"][evaluate.fraction_key(config.eval.known_fractions[0])]
      if config.schedule.name == "plateau" and plateau.update(first["loss"]):
        logging.info("validation loss plateaued: learning rate scale now %g", plateau.scale)
      selected = evaluate.selection_value(report, config)  # eval.selection_metric
      if selected > best_metric:
        best_metric, is_best = selected, True
      last_log_time = time.perf_counter()  # evaluation time is not training speed
    if done % config.checkpoint_every_steps == 0 or done == num_steps or is_best:
      ckpts.save(done, state, checkpoint_meta(), best=is_best)

  # --- Final report on the evaluation and test splits.
  ckpts.wait()
  final_step = int(state["step"])
  final = {split: run_evaluation(split, final_step)
           for split in dict.fromkeys((config.data.eval_split, config.data.test_split)) if split}
  path = evaluate.write_results(workdir, final, step=final_step,
                                checkpoint=f"checkpoints/{final_step}", meta=meta)
  if is_chief:
    for split, report in final.items():
      print(f"\n{meta.name} / {split} @ step {final_step}")
      print(evaluate.table(report))
    print(f"\nresults: {path}")
  writer.flush()
  ckpts.close()
  return {"reports": final, "train_log": train_log, "state": state}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "latest") -> dict:
  """``--mode=eval``: evaluate a saved checkpoint on the evaluation and test splits."""
  check_config(config)
  writer = tensorboard_writer(workdir)
  directory, step = checkpoint.resolve(workdir, which)
  mesh = make_mesh(config)
  source = open_data(config)
  meta = source.meta
  num_steps = total_train_steps(config, meta.split_sizes[config.data.train_split])
  graphdef, state, rng_state, _, _ = abstract_train_state(config, mesh, meta.num_labels,
                                                          num_steps)
  state, _ = checkpoint.restore(directory, step, state, num_labels=meta.num_labels,
                                model_config=stored_model_config(
                                    model_kwargs(config, meta.num_labels)))
  evaluator = evaluate.Evaluator(graphdef, config, mesh, source)
  reports = {}
  for split in dict.fromkeys((config.data.eval_split, config.data.test_split)):
    if split:
      reports[split] = evaluator.run(state, rng_state, split)
      evaluate.log_report(writer, reports[split], step=step, split=split)
      evaluate.append_history(workdir, reports[split], step=step, split=split)
  label = os.path.relpath(os.path.join(directory, str(step)), workdir)
  path = evaluate.write_results(workdir, reports, step=step, checkpoint=label, meta=meta)
  if jax.process_index() == 0:
    for split, report in reports.items():
      print(f"\n{meta.name} / {split} @ step {step} ({label})")
      print(evaluate.table(report))
    print(f"\nresults: {path}")
  writer.flush()
  return reports
