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

Extra-label evaluation (CUB): for each n in ``config.eval.known_groups`` all concepts of n
concept groups (a seeded choice, nested across n; `label_mask.extra_label_states`) are
given as known, except those marked not visible in the image; the split's report then also
has ``"known_groups": {"0": {..., "class_acc", "concept_acc", "known_concepts"}, "10": ...}``
where ``known_concepts`` is the mean fraction of concepts given. On datasets with concepts
every metrics dict also has ``class_acc`` and ``concept_acc``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tensorflow.io import gfile

from ctran_jax import augment, ema, label_mask, metrics, report_plots, sharding, thresholds
from ctran_jax.config_util import check_choice, check_range
from ctran_jax.data import pipeline

FORMAT = "ctran_jax/eval/v1"


def fraction_key(fraction: float) -> str:
  """'25' for 0.25: the known percentage used as a key in reports."""
  return f"{fraction * 100:g}"


def finish_eval_images(config):
  """None, or ``batch -> images``: the device half of the eval transform when eval batches
  carry its host half (``config.data.resize_on_device``: `augment.centre_crop_windows` of
  the batch's image/extent/origin), in the model's dtype (the model casts its input to it
  anyway)."""
  if not config.data.resize_on_device:
    return None
  data, dtype = config.data, jnp.dtype(config.model.dtype)
  return lambda batch: augment.centre_crop_windows(
      batch["image"], batch["extent"], batch["origin"], scale=data.scale_size,
      size=data.image_size, mean=data.mean, std=data.std, dtype=dtype)


# The fields of an eval batch that the images are made of (`pipeline.eval_dataset`).
IMAGE_FIELDS = ("image", "extent", "origin")


def make_predict_step(model_def, finish_images=None):
  """A step returning logits (F, B, L) for F sets of known labels, plus the batch's labels.

  The backbone runs once per batch; only the transformer part repeats per known set. The
  batch passes through so that all hosts get the full (replicated) arrays back.
  ``finish_images(batch) -> images`` (`finish_eval_images`), when given, makes the model
  input from the batch's image fields inside the step.
  """
  def predict_step(params, batch_stats, batch):
    model = model_def.merge(params, batch_stats)
    model.eval()
    features = model.backbone(finish_images(batch) if finish_images else batch["image"])
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
  """Evaluates a train state on the splits of one dataset: the metrics, their log lines,
  TensorBoard scalars and ``eval/history.jsonl``, and the final report.

  Checks ``config.eval`` when built, so a bad value stops the run before anything compiles.
  """

  def __init__(self, model_def, config, mesh, source: pipeline.DataSource, *, workdir: str,
               writer=None):
    self.config, self.mesh, self.source, self.meta = config, mesh, source, source.meta
    self.workdir, self.writer = workdir, writer
    self.num_labels = source.meta.num_labels
    e = config.eval
    self.fractions = tuple(e.known_fractions)
    if not self.fractions:
      raise ValueError("config.eval.known_fractions is empty; expected fractions such as "
                       "(0.0, 0.5)")
    for f in self.fractions:
      check_range("eval.known_fractions", f, 0.0, 1.0, high_open=True)
    check_choice("eval.selection_metric", e.selection_metric,
                 metrics.METRIC_NAMES + metrics.CUB_METRIC_NAMES)
    self.groups = tuple(e.known_groups)
    if any(not isinstance(n, int) or n < 0 for n in self.groups):
      raise ValueError(f"config.eval.known_groups={self.groups!r}; expected integers >= 0 "
                       "(numbers of concept groups given as known)")
    if self.groups and not (self.meta.concept_groups and self.meta.has_label_visible):
      raise ValueError(f"config.eval.known_groups={self.groups} needs a dataset with concept "
                       f"groups and 'label_visible' (such as ctran_cub); {self.meta.name} "
                       "has none")
    num_groups = len(self.meta.group_names) or (max(self.meta.concept_groups, default=-1) + 1)
    if any(not 0 <= n <= num_groups for n in self.groups):
      raise ValueError(f"config.eval.known_groups={self.groups}; {self.meta.name} has "
                       f"{num_groups} concept groups")
    self.num_groups = num_groups
    self.local_batch = sharding.local_batch_size(e.batch_size, mesh, key="eval.batch_size")
    self.predict = jax.jit(make_predict_step(model_def, finish_eval_images(config)),
                           out_shardings=sharding.replicated(mesh))
    self._done = {}  # (split, step) -> report
    self._scores = {}  # (split, step) -> (probabilities, labels) with no label known

  def predictions(self, state, split: str, *, raw: bool = False) -> dict[str, np.ndarray]:
    """Host arrays over the valid examples of `split`: logits (F, N, L), labels, states.

    The EMA weights are evaluated when the state has them (`ema.weights_of`), the trained
    ones with `raw`.
    """
    weights = ema.weights_of(state, raw=raw)
    n_batches = pipeline.num_eval_batches(self.source, split, batch_size=self.local_batch,
                                          process_count=jax.process_count())
    every = max(1, n_batches // 5) if n_batches >= 50 else n_batches + 1
    parts, start = [], time.perf_counter()
    batches = pipeline.eval_dataset(self.source, split, batch_size=self.local_batch,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    skipped = 0
    for i, local in enumerate(batches):
      skipped += int(np.sum(local["skipped"])) if "skipped" in local else 0
      states = np.stack([
          label_mask.eval_states(local["labels"], local["example_id"], known_fraction=f,
                                 seed=self.config.eval.seed) for f in self.fractions] + [
          label_mask.extra_label_states(
              local["labels"], local["label_visible"], concept_groups=self.meta.concept_groups,
              num_known_groups=n, num_groups=self.num_groups, seed=self.config.eval.seed)
          for n in self.groups], axis=1)
      images = {k: local[k] for k in IMAGE_FIELDS if k in local}
      batch = sharding.global_batch({**images, "labels": local["labels"], "states": states,
                                     "valid": local["valid"]}, self.mesh)
      parts.append(jax.device_get(self.predict(weights["params"], weights["batch_stats"],
                                               batch)))
      if (i + 1) % every == 0:
        logging.info("evaluating %s: %d/%d batches, %.0f s", split, i + 1, n_batches,
                     time.perf_counter() - start)
    if skipped:
      logging.warning("evaluating %s: %d unreadable examples skipped (data.on_bad_example)",
                      split, skipped)
    if not parts:
      raise ValueError(f"split {split!r} of {self.meta.name} has no examples")
    out = {k: np.concatenate([p[k] for p in parts], axis=1 if k in ("logits", "states") else 0)
           for k in parts[0]}
    valid = out.pop("valid").astype(bool)
    return {"logits": out["logits"][:, valid], "states": out["states"][:, valid],
            "labels": out["labels"][valid]}

  def run(self, state, split: str) -> dict:
    """{"num_examples": N, "known": {percent: metrics + loss}} for one split
    (+ "known_groups": {n: ...} for extra-label evaluation)."""
    return self._run(state, split)[0]

  def _run(self, state, split: str, *, raw: bool = False):
    """(report, (probabilities, labels) at 0 % known or None)."""
    pred = self.predictions(state, split, raw=raw)
    scores = None
    if 0.0 in self.fractions:
      scores = (metrics.sigmoid(pred["logits"][self.fractions.index(0.0)]), pred["labels"])
    report = {"num_examples": int(pred["labels"].shape[0]), "known": {}}
    concepts = self.meta.num_concepts or None
    sets = [("known", fraction_key(f)) for f in self.fractions]
    sets += [("known_groups", str(n)) for n in self.groups]
    for (section, key), logits, states in zip(sets, pred["logits"], pred["states"],
                                              strict=True):
      any_known = bool(np.any(states != label_mask.UNKNOWN))
      values = metrics.compute_metrics(metrics.sigmoid(logits), pred["labels"],
                                       states if any_known else None, num_concepts=concepts)
      values["loss"] = bce_loss_per_example(logits, pred["labels"], states)
      if section == "known_groups":
        values["known_concepts"] = float(np.mean(states[:, :concepts] != label_mask.UNKNOWN))
      report.setdefault(section, {})[key] = values
    return report, scores

  def evaluate(self, state, split: str, step: int) -> dict:
    """`run`, logged (console, TensorBoard, ``eval/history.jsonl``) once per (split, step)."""
    if (split, step) not in self._done:
      start = time.perf_counter()
      report, self._scores[split, step] = self._run(state, split)
      if self.writer is not None:
        log_report(self.writer, report, step=step, split=split,
                   seconds=time.perf_counter() - start)
      append_history(self.workdir, report, step=step, split=split)
      self._done[split, step] = report
    return self._done[split, step]

  def selection_value(self, report: dict) -> float:
    """The number model selection maximises: ``config.eval.selection_metric`` (default mAP)
    at the first known fraction (regular inference when it is 0)."""
    return report["known"][fraction_key(self.fractions[0])][self.config.eval.selection_metric]

  def final_report(self, state, step: int, checkpoint: str) -> dict[str, dict]:
    """Evaluate the eval and test splits, write ``eval/results.json`` and print the tables;
    the same for a finished training run and for ``--mode=eval``.

    Per-class thresholds are fitted on the eval split with no label known (each class's
    best F1, `thresholds.fit`), saved as ``eval/thresholds.json`` and applied to every
    split: its report gains ``"calibrated": {"fitted_on": split, "CP", ..., "OF1"}``, the
    thresholded metrics at those thresholds (at 0 % known). Only the other splits measure
    them honestly: on the split they were fitted on they are optimistic.
    """
    data = self.config.data
    reports = {split: self.evaluate(state, split, step)
               for split in dict.fromkeys((data.eval_split, data.test_split)) if split}
    if data.eval_split and (data.eval_split, step) in self._scores and \
        self._scores[data.eval_split, step] is not None:
      fitted = thresholds.fit(*self._scores[data.eval_split, step])
      if jax.process_index() == 0:
        thresholds.save(os.path.join(self.workdir, "eval", "thresholds.json"), fitted,
                        fitted_on=data.eval_split, step=step)
      for split, report in reports.items():
        report["calibrated"] = {"fitted_on": data.eval_split,
                                **metrics.thresholded_metrics(*self._scores[split, step],
                                                              fitted)}
    if self.config.ema.evaluate_raw and "ema" in state:
      for split, report in reports.items():
        raw = self._run(state, split, raw=True)[0]
        report["raw_weights"] = {"known": raw["known"]}
        logging.info("raw weights (no EMA), %s: mAP %s", split, " / ".join(
            f"{v['mAP'] * 100:.1f}" for v in raw["known"].values()))
    path = write_results(self.workdir, reports, step=step, checkpoint=checkpoint,
                         meta=self.meta)
    if jax.process_index() == 0:
      full = "".join(f"{self.meta.name} / {split} @ step {step} ({checkpoint})\n"
                     f"{table(report)}\n\n" for split, report in reports.items())
      with gfile.GFile(os.path.join(self.workdir, "eval", "results.txt"), "w") as f:
        f.write(full)
      for split, report in reports.items():
        print(f"\n{self.meta.name} / {split} @ step {step} ({checkpoint})")
        print(table(report, rows=CONSOLE_ROWS))
      print(f"\nresults: {path} (all metrics as tables: "
            f"{os.path.join(os.path.dirname(path), 'results.txt')}; plots: report.png)")
      self._write_plots(reports, step)
    return reports

  def _write_plots(self, reports: dict[str, dict], step: int) -> None:
    """``eval/report.png`` and TensorBoard image ``eval/report`` (`report_plots`); per-class
    panels on the test split, else the eval split. A plotting error is logged, not raised:
    results.json is already written."""
    split = self.config.data.test_split or self.config.data.eval_split
    try:
      report_plots.write(self.workdir, reports, self.meta.label_names,
                         self._scores.get((split, step)), split=split, step=step,
                         title=f"{self.meta.name} @ step {step}", writer=self.writer)
    except Exception:  # noqa: BLE001 - a plot must not fail a finished evaluation
      logging.exception("could not write the evaluation report plots")


CONSOLE_ROWS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "concept_acc", "class_acc")


def table(report: dict, rows=None) -> str:
  """The paper-style table of one split's report (one column per known fraction/groups);
  `rows` keeps only those metrics (the console's short table)."""
  columns = {f"known {k}%": {m: x for m, x in v.items()
                             if m != "loss" and (rows is None or m in rows)}
             for k, v in report["known"].items()}
  losses = "  ".join(f"{k}%: {v['loss']:.4f}" for k, v in report["known"].items())
  text = (metrics.format_table(columns)
          + f"\nloss (summed BCE on unknown labels / example)  {losses}")
  calibrated = report.get("calibrated")
  if calibrated:
    values = "  ".join(f"{k} {calibrated[k] * 100:.1f}"
                       for k in ("CP", "CR", "CF1", "OP", "OR", "OF1"))
    text += (f"\nper-class thresholds fitted on {calibrated['fitted_on']}, 0% known:  "
             f"{values}")
  groups = report.get("known_groups")
  if groups:
    lines = ["extra labels: concept groups known  class acc  concept acc  concepts known"]
    lines += [f"  {k:>33s}  {v['class_acc'] * 100:9.1f}  {v['concept_acc'] * 100:11.1f}  "
              f"{v['known_concepts'] * 100:13.1f}%" for k, v in groups.items()]
    text += "\n" + "\n".join(lines)
  return text


def log_report(writer, report: dict, *, step: int, split: str, seconds: float = 0.0) -> None:
  """TensorBoard scalars ``<split>/known<percent>/<metric>`` and a one-line log."""
  scalars = {f"{split}/known{k}/{name}": v for k, values in report["known"].items()
             for name, v in values.items()}
  scalars.update({f"{split}/groups{k}/{name}": v
                  for k, values in report.get("known_groups", {}).items()
                  for name, v in values.items()})
  writer.write_scalars(step, scalars)
  known = report["known"]
  maps = " / ".join(f"{v['mAP'] * 100:.1f}" for v in known.values())
  summary = f"mAP {maps} at {'/'.join(known)} % known"
  summary += "".join(f"; {k} groups: class acc {v['class_acc'] * 100:.1f}"
                     for k, v in report.get("known_groups", {}).items())
  logging.info("eval     %s @ %d: %s (%d examples, %.1f s)", split, step, summary,
               report["num_examples"], seconds)


def append_history(workdir: str, report: dict, *, step: int, split: str) -> None:
  if jax.process_index() != 0:
    return
  # gfile, so that gs:// workdirs work (GCS has no append: read, extend, rewrite).
  path = os.path.join(workdir, "eval", "history.jsonl")
  gfile.makedirs(os.path.dirname(path))
  line = json.dumps({"step": step, "split": split, **report}) + "\n"
  if "://" in path:
    previous = gfile.GFile(path).read() if gfile.exists(path) else ""
    with gfile.GFile(path, "w") as f:
      f.write(previous + line)
  else:
    with open(path, "a") as f:
      f.write(line)


def truncate_history(workdir: str, step: int) -> None:
  """Drop evaluations after `step` from ``eval/history.jsonl``: a resumed run redoes them,
  so the file never holds two entries for one (step, split)."""
  path = os.path.join(workdir, "eval", "history.jsonl")
  if jax.process_index() != 0 or not gfile.exists(path):
    return
  with gfile.GFile(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    with gfile.GFile(path + ".tmp", "w") as f:
      f.write("".join(kept))
    gfile.rename(path + ".tmp", path, overwrite=True)


def write_results(workdir: str, reports: dict[str, dict], *, step: int, checkpoint: str,
                  meta) -> str:
  """Write ``eval/results.json`` atomically (process 0); returns its path."""
  path = os.path.join(workdir, "eval", "results.json")
  if jax.process_index() != 0:
    return path
  gfile.makedirs(os.path.dirname(path))
  doc = {"format": FORMAT, "dataset": meta.name, "num_labels": meta.num_labels,
         "label_names": list(meta.label_names), "step": step, "checkpoint": checkpoint,
         "splits": reports}
  with gfile.GFile(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
  gfile.rename(path + ".tmp", path, overwrite=True)
  return path
