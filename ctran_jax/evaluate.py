"""Evaluation: regular and partial-label inference over a split, metrics and the JSON report.

For every known fraction in ``config.eval.known_fractions``, ``int(fraction * L)`` labels of
each example are given to the model with their true state (chosen by `label_mask.eval_states`,
a function of the example id only); fraction 0 is regular inference. Metrics are those of
the paper (`metrics.compute_metrics`): mAP is taken over the unknown entries when some labels
are known, the thresholded metrics over all entries, as the reference does.

Report layout (``eval/results.json``, written by process 0)::

  {"format": "ctran_jax/eval/v1", "dataset": ..., "num_labels": L, "label_names": [...],
   "step": S, "checkpoint": "checkpoints/S",
   "splits": {"validation": {"num_examples": N,
                             "known": {"0": {"mAP": ..., "CF1": ..., ..., "loss": ...},
                                       "25": {...}, "50": {...}, "75": {...}}},
              "test": {...}}}

Keys of ``known`` are the known percentages; metric values are fractions (0..1); ``loss`` is
the reference's validation loss (summed BCE over unknown entries / examples). Every
evaluation is also appended to ``eval/history.jsonl`` and written to TensorBoard.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ctran_jax import label_mask, metrics, sharding
from ctran_jax.data import pipeline

FORMAT = "ctran_jax/eval/v1"


def fraction_key(fraction: float) -> str:
  """'25' for 0.25: the known percentage used as a key in reports."""
  return f"{fraction * 100:g}"


def make_predict_step(graphdef):
  """A step returning logits (F, B, L) for F sets of known labels, plus the batch's labels.

  The backbone runs once per batch; only the transformer part repeats per known set. The
  batch passes through so that all hosts get the full (replicated) arrays back.
  """
  def predict_step(params, batch_stats, rng_state, batch):
    model = nnx.merge(graphdef, params, batch_stats, rng_state)
    model.eval()
    features = model.backbone(batch["image"])
    states = jnp.moveaxis(batch["states"], 1, 0)  # (B, F, L) -> (F, B, L)
    logits = jnp.stack([model.classify_features(features, s)["logits"] for s in states])
    return {"logits": logits, "labels": batch["labels"], "states": states,
            "valid": batch["valid"]}

  return predict_step


def bce_loss_per_example(logits: np.ndarray, labels: np.ndarray, states: np.ndarray) -> float:
  """Summed BCE-with-logits over unknown entries, divided by the number of examples."""
  x, y = logits.astype(np.float64), labels.astype(np.float64)
  per_entry = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
  return float(np.sum(per_entry * (states == label_mask.UNKNOWN)) / max(len(x), 1))


class Evaluator:
  """Runs the compiled prediction step over a split and computes the metrics."""

  def __init__(self, graphdef, config, mesh, num_labels: int):
    self.config, self.mesh, self.num_labels = config, mesh, num_labels
    self.fractions = tuple(config.eval.known_fractions)
    self.local_batch = sharding.local_batch_size(config.eval.batch_size, mesh)
    self.predict = jax.jit(make_predict_step(graphdef),
                           out_shardings=sharding.replicated(mesh))

  def predictions(self, state, rng_state, split: str) -> dict[str, np.ndarray]:
    """Host arrays over the valid examples of `split`: logits (F, N, L), labels, states."""
    data = self.config.data
    n_batches = pipeline.num_eval_batches(data, split, batch_size=self.local_batch,
                                          process_count=jax.process_count())
    every = max(1, n_batches // 5) if n_batches >= 50 else n_batches + 1
    parts, start = [], time.perf_counter()
    batches = pipeline.eval_dataset(data, split, batch_size=self.local_batch,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    for i, local in enumerate(batches):
      states = np.stack([
          label_mask.eval_states(local["labels"], local["example_id"], known_fraction=f,
                                 seed=self.config.eval.seed) for f in self.fractions], axis=1)
      batch = sharding.global_batch({"image": local["image"], "labels": local["labels"],
                                     "states": states, "valid": local["valid"]}, self.mesh)
      parts.append(jax.device_get(self.predict(state["params"], state["batch_stats"],
                                               rng_state, batch)))
      if (i + 1) % every == 0:
        logging.info("evaluating %s: %d/%d batches, %.0f s", split, i + 1, n_batches,
                     time.perf_counter() - start)
    if not parts:
      raise ValueError(f"split {split!r} of {data.name} has no examples")
    out = {k: np.concatenate([p[k] for p in parts], axis=1 if k in ("logits", "states") else 0)
           for k in parts[0]}
    valid = out.pop("valid").astype(bool)
    return {"logits": out["logits"][:, valid], "states": out["states"][:, valid],
            "labels": out["labels"][valid]}

  def run(self, state, rng_state, split: str) -> dict:
    """{"num_examples": N, "known": {percent: metrics + loss}} for one split."""
    pred = self.predictions(state, rng_state, split)
    report = {"num_examples": int(pred["labels"].shape[0]), "known": {}}
    for f, logits, states in zip(self.fractions, pred["logits"], pred["states"], strict=True):
      values = metrics.compute_metrics(metrics.sigmoid(logits), pred["labels"],
                                       states if f > 0 else None)
      values["loss"] = bce_loss_per_example(logits, pred["labels"], states)
      report["known"][fraction_key(f)] = values
    return report


def table(report: dict) -> str:
  """The paper-style table of one split's report (one column per known fraction)."""
  columns = {f"known {k}%": {m: x for m, x in v.items() if m != "loss"}
             for k, v in report["known"].items()}
  losses = "  ".join(f"{k}%: {v['loss']:.4f}" for k, v in report["known"].items())
  return (metrics.format_table(columns)
          + f"\nloss (summed BCE on unknown labels / example)  {losses}")


def log_report(writer, report: dict, *, step: int, split: str) -> None:
  """TensorBoard scalars ``<split>/known<percent>/<metric>`` and a one-line log."""
  scalars = {f"{split}/known{k}/{name}": v for k, values in report["known"].items()
             for name, v in values.items()}
  writer.write_scalars(step, scalars)
  summary = "  ".join(f"known {k}%: mAP {v['mAP']:.4f}" for k, v in report["known"].items())
  logging.info("eval %s @ %d (%d examples)  %s", split, step, report["num_examples"], summary)


def append_history(workdir: str, report: dict, *, step: int, split: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "history.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, "split": split, **report}) + "\n")


def write_results(workdir: str, reports: dict[str, dict], *, step: int, checkpoint: str,
                  meta) -> str:
  """Write ``eval/results.json`` atomically (process 0); returns its path."""
  path = os.path.join(workdir, "eval", "results.json")
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  doc = {"format": FORMAT, "dataset": meta.name, "num_labels": meta.num_labels,
         "label_names": list(meta.label_names), "step": step, "checkpoint": checkpoint,
         "splits": reports}
  with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(path + ".tmp", path)
  return path
