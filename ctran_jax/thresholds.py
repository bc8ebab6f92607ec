"""Per-class decision thresholds fitted to maximise each class's F1 on held-out data.

One threshold of 0.5 for every class is the reference's rule; rare classes then hardly
ever fire and frequent ones fire too often. Fitting one threshold per class on the
validation split (never on the split the metrics are reported on) is the usual repair.
``thresholds.json`` holds them beside a model: ``{"format", "thresholds": [L floats],
"fitted_on": split, "step": S, "known_fraction": 0.0}``.
"""

from __future__ import annotations

import json
import os

import numpy as np

DEFAULT = 0.5
FORMAT = "ctran_jax/thresholds/v1"


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
  """The threshold t maximising F1 of ``scores >= t`` for one class (DEFAULT without positives).

  Candidates are the distinct scores; on a tie of F1 the largest threshold wins (fewer
  false positives). The returned value is the midpoint between the chosen score and the
  next lower one, so that nearby unseen scores are treated alike.
  """
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets).astype(bool)
  positives = int(targets.sum())
  if positives == 0:
    return DEFAULT
  order = np.argsort(-scores, kind="stable")
  s, t = scores[order], targets[order]
  tp = np.cumsum(t)
  predicted = np.arange(1, len(s) + 1)
  last_of_value = np.append(s[1:] != s[:-1], True)  # thresholds fall between distinct scores
  f1 = np.where(last_of_value, 2 * tp / (predicted + positives), -1.0)
  best = int(np.flatnonzero(f1 == f1.max())[0])  # the highest threshold among the best F1
  below = s[best + 1] if best + 1 < len(s) else s[best] - 1e-6
  return float((s[best] + below) / 2)


def fit(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """(L,) thresholds, one per column of ``probs`` (N, L) against 0/1 ``targets`` (N, L)."""
  probs, targets = np.asarray(probs), np.asarray(targets)
  if probs.shape != targets.shape or probs.ndim != 2:
    raise ValueError(f"need probs and targets of the same (N, L) shape, got {probs.shape} "
                     f"and {targets.shape}")
  return np.array([best_f1_threshold(probs[:, i], targets[:, i])
                   for i in range(probs.shape[1])], np.float32)


def save(path: str, thresholds, *, fitted_on: str, step: int) -> None:
  """Write atomically (a temporary name, then a rename); ``gs://`` paths go through gfile."""
  doc = {"format": FORMAT, "thresholds": [float(t) for t in thresholds],
         "fitted_on": fitted_on, "step": int(step), "known_fraction": 0.0}
  if "://" in path:
    from tensorflow.io import gfile

    with gfile.GFile(path + ".tmp", "w") as f:
      json.dump(doc, f, indent=1)
    gfile.rename(path + ".tmp", path, overwrite=True)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(path + ".tmp", path)


def load(path: str) -> dict:
  """The document `save` wrote; a clear error for a file of another kind."""
  with open(path) as f:
    doc = json.load(f)
  if doc.get("format") != FORMAT:
    raise ValueError(f"{path} is not a thresholds file of this version "
                     f"(format {doc.get('format')!r})")
  return doc
