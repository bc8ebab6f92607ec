"""Multi-label evaluation metrics on host numpy arrays, matching the C-Tran reference.

The reference (``utils/evaluate.py``, ``utils/metrics.py``) mixes sklearn and torch; this module
re-derives the same numbers with vectorised numpy so evaluation needs neither, and so the
results equal the golden values in ``tests/data/parity/metrics_golden.npz``. Semantics:

* everything is computed on float32 probabilities, predictions are ``p >= 0.5``;
* mAP is sklearn's non-interpolated AP (ties grouped per distinct score), macro-averaged with
  classes without positives counted as 0 (sklearn >= 1.x); when some labels are known, the
  reference's "custom" mAP over the unknown entries only (classes without unknown positives
  are skipped);
* thresholded metrics use all entries; CF1/OF1 are harmonic means of the macro/micro P and R;
* top-3 variants keep, per row, the probs >= the row's 3rd largest (ties kept) that are also
  >= 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

METRIC_NAMES = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3",
                "OP_top3", "OR_top3", "OF1_top3", "ACC", "HA", "ebF1")
CUB_METRIC_NAMES = ("concept_acc", "class_acc")

# Row labels used by `format_table` (the paper's names; top-3 variants marked).
DISPLAY_NAMES = {
  "mAP": "mAP", "CP": "CP", "CR": "CR", "CF1": "CF1", "OP": "OP", "OR": "OR", "OF1": "OF1",
  "CP_top3": "CP (top-3)", "CR_top3": "CR (top-3)", "CF1_top3": "CF1 (top-3)",
  "OP_top3": "OP (top-3)", "OR_top3": "OR (top-3)", "OF1_top3": "OF1 (top-3)",
  "ACC": "Subset acc", "HA": "Hamming acc", "ebF1": "Example F1",
  "concept_acc": "Concept acc", "class_acc": "Class acc",
}

THRESHOLD = 0.5
TOP_K = 3
UNKNOWN = -1
# Columns are ranked in chunks of about this many entries, bounding the AP temporaries
# (a handful of 8-byte arrays of this size, ~50 MB) for large evaluations such as 40k x 1000.
_AP_CHUNK_ELEMENTS = 1 << 20


def sigmoid(logits) -> np.ndarray:
  """Numerically stable float32 logistic function (no overflow for large |x|)."""
  x = np.asarray(logits, dtype=np.float32)
  e = np.exp(-np.abs(x))  # in (0, 1]
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Input validation


def _as_probs(probs, ndim: int, name: str = "probs") -> np.ndarray:
  p = np.asarray(probs)
  if p.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {p.shape}")
  if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)
          or p.dtype == bool):
    raise ValueError(f"{name} must be numeric, got dtype {p.dtype}")
  p = p.astype(np.float32)  # the reference evaluates float32 probabilities
  if not np.all(np.isfinite(p)):
    raise ValueError(f"{name} contains NaN or inf")
  return p


def _as_targets(targets, shape: tuple[int, ...], name: str = "targets") -> np.ndarray:
  t = np.asarray(targets)
  if t.shape != shape:
    raise ValueError(f"{name} shape {t.shape} does not match probs shape {shape}")
  if not np.all((t == 0) | (t == 1)):
    raise ValueError(f"{name} must contain only 0 and 1")
  return t.astype(bool)


def _as_states(label_states, shape: tuple[int, ...]) -> np.ndarray:
  s = np.asarray(label_states)
  if s.shape != shape:
    raise ValueError(f"label_states shape {s.shape} does not match probs shape {shape}")
  if not np.all((s == UNKNOWN) | (s == 0) | (s == 1)):
    raise ValueError("label_states must contain only -1 (unknown), 0 and 1")
  return s


def _validate(probs, targets, label_states=None):
  p = _as_probs(probs, 2)
  if p.shape[0] == 0 or p.shape[1] == 0:
    raise ValueError(f"probs must have at least one sample and one label, got shape {p.shape}")
  t = _as_targets(targets, p.shape)
  s = None if label_states is None else _as_states(label_states, p.shape)
  return p, t, s


# ---------------------------------------------------------------------------------------------
# Average precision


def _ap_columns(targets: np.ndarray, scores: np.ndarray, valid: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Per-column AP over the entries where ``valid`` (all if None) and their positive counts.

  Sorting each column by decreasing score, a positive contributes (1/P) x the precision at the
  end of its tie group, which is sklearn's sum_n (R_n - R_{n-1}) P_n over distinct thresholds
  (so the order inside a tie group is irrelevant). Invalid entries stay in the sort but weigh
  nothing. Columns without (valid) positives get AP 0.
  """
  n, c = scores.shape
  ap = np.zeros(c, dtype=np.float64)
  npos = np.zeros(c, dtype=np.int64)
  step = max(1, _AP_CHUNK_ELEMENTS // max(n, 1))
  for lo in range(0, c, step):
    sl = slice(lo, min(c, lo + step))
    # One class per row (contiguous) sorts about twice as fast as sorting along axis 0.
    neg = -np.ascontiguousarray(scores[:, sl].T)
    order = np.argsort(neg, axis=1)
    s_sorted = np.take_along_axis(neg, order, axis=1)
    pos = np.take_along_axis(np.ascontiguousarray(targets[:, sl].T), order, axis=1)
    if valid is not None:
      w = np.take_along_axis(np.ascontiguousarray(valid[:, sl].T), order, axis=1)
      pos = pos & w
    tps = np.cumsum(pos, axis=1, dtype=np.int64)
    # Index of the last entry of each entry's tie group (the threshold it belongs to).
    is_end = np.ones(s_sorted.shape, dtype=bool)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    end = np.where(is_end, np.arange(n)[None, :], n)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    tp_end = np.take_along_axis(tps, end, axis=1)
    # Entries counted (predicted positive) at that threshold.
    seen_end = (end + 1 if valid is None
                else np.take_along_axis(np.cumsum(w, axis=1, dtype=np.int64), end, axis=1))
    precision = np.divide(tp_end, seen_end, out=np.zeros(tps.shape), where=pos)
    p_count = tps[:, -1]
    npos[sl] = p_count
    ap[sl] = np.divide(precision.sum(axis=1), p_count, out=np.zeros(p_count.shape),
                       where=p_count > 0)
  return ap, npos


def average_precision(targets_1d, scores_1d) -> float:
  """sklearn-style non-interpolated AP of one class (ties grouped); 0 without positives."""
  s = _as_probs(scores_1d, 1, "scores_1d")
  t = _as_targets(targets_1d, s.shape, "targets_1d")
  if s.size == 0:
    raise ValueError("average_precision needs at least one sample")
  ap, _ = _ap_columns(t[:, None], s[:, None], None)
  return float(ap[0])


def per_class_average_precision(targets, probs) -> np.ndarray:
  """AP of every class (column) as a float64 array; classes without positives get 0."""
  p, t, _ = _validate(probs, targets)
  return _ap_columns(t, p, None)[0]


def mean_average_precision(targets, probs, label_states=None) -> float:
  """Macro mAP; the reference's masked mAP over unknown entries when any label is known.

  Plain: mean over all classes, a class without positives counts as AP 0. Masked (some
  ``label_states != -1``): per class only unknown entries count, and classes with no unknown
  entry or no unknown positive are skipped; NaN if every class is skipped.
  """
  p, t, s = _validate(probs, targets, label_states)
  if s is None or np.all(s == UNKNOWN):
    return float(np.mean(_ap_columns(t, p, None)[0]))
  unknown = s == UNKNOWN
  ap, npos = _ap_columns(t, p, unknown)
  kept = npos > 0  # implies at least one unknown entry
  return float(np.mean(ap[kept])) if kept.any() else float("nan")


# ---------------------------------------------------------------------------------------------
# Thresholded metrics


def _f1(precision: float, recall: float) -> float:
  total = precision + recall
  return 2.0 * precision * recall / total if total > 0 else 0.0


def _precision_recall(pred: np.ndarray, targets: np.ndarray, suffix: str = "") -> dict[str, float]:
  """Macro (C*) and micro (O*) precision/recall/F1; 0/0 counts as 0."""
  tp = np.sum(pred & targets, axis=0, dtype=np.int64)
  n_pred = np.sum(pred, axis=0, dtype=np.int64)
  n_pos = np.sum(targets, axis=0, dtype=np.int64)
  zeros = np.zeros(tp.shape)
  cp = float(np.mean(np.divide(tp, n_pred, out=zeros.copy(), where=n_pred > 0)))
  cr = float(np.mean(np.divide(tp, n_pos, out=zeros.copy(), where=n_pos > 0)))
  tp_all, pred_all, pos_all = int(tp.sum()), int(n_pred.sum()), int(n_pos.sum())
  op = tp_all / pred_all if pred_all > 0 else 0.0
  orr = tp_all / pos_all if pos_all > 0 else 0.0
  return {f"CP{suffix}": cp, f"CR{suffix}": cr, f"CF1{suffix}": _f1(cp, cr),
          f"OP{suffix}": op, f"OR{suffix}": orr, f"OF1{suffix}": _f1(op, orr)}


def thresholded_metrics(probs, targets, thresholds) -> dict[str, float]:
  """CP/CR/CF1/OP/OR/OF1 with one threshold per class (``probs >= thresholds[c]``)."""
  p, t, _ = _validate(probs, targets)
  return _precision_recall(p >= np.asarray(thresholds, p.dtype)[None, :], t)


def top_k_predictions(probs: np.ndarray, k: int = TOP_K) -> np.ndarray:
  """Per row: probs >= the row's k-th largest prob (ties kept) and >= 0.5."""
  c = probs.shape[1]
  k = min(k, c)
  kth = np.partition(probs, c - k, axis=1)[:, c - k:c - k + 1]
  return (probs >= kth) & (probs >= THRESHOLD)


def _example_f1(pred: np.ndarray, targets: np.ndarray) -> float:
  """Mean per-row 2|y & y_hat| / (|y| + |y_hat|) in float32, skipping rows where both are empty."""
  inter = np.sum(pred & targets, axis=1).astype(np.float32)
  total = (np.sum(pred, axis=1) + np.sum(targets, axis=1)).astype(np.float32)
  keep = total > 0
  if not keep.any():
    return 0.0
  return float(np.mean(np.float32(2.0) * inter[keep] / total[keep], dtype=np.float32))


def compute_metrics(probs, targets, label_states=None, *, num_concepts=None) -> dict[str, float]:
  """All of METRIC_NAMES for (N, C) probs/targets (+ concept_acc/class_acc for CUB).

  ``label_states`` (-1 unknown, 0/1 known) only changes mAP (see `mean_average_precision`);
  thresholded metrics use every entry. With ``num_concepts`` the first that many columns are
  CUB concepts and the rest one-hot classes: concept_acc is the mean per-concept accuracy and
  class_acc the argmax accuracy over the class columns.
  """
  p, t, s = _validate(probs, targets, label_states)
  results = {"mAP": mean_average_precision(t, p, s)}
  pred = p >= THRESHOLD
  results.update(_precision_recall(pred, t))
  results.update(_precision_recall(top_k_predictions(p), t, "_top3"))
  results["ACC"] = float(np.mean(np.all(pred == t, axis=1)))
  results["HA"] = float(1.0 - np.mean(pred != t))
  results["ebF1"] = _example_f1(pred, t)
  if num_concepts is not None:
    k = int(num_concepts)
    if k != num_concepts or not 0 < k < p.shape[1]:
      raise ValueError(f"num_concepts must be an integer in [1, {p.shape[1] - 1}] for "
                       f"{p.shape[1]} columns, got {num_concepts!r}")
    results["concept_acc"] = float(np.mean(np.mean(pred[:, :k] == t[:, :k], axis=0)))
    results["class_acc"] = float(np.mean(np.argmax(p[:, k:], axis=1)
                                          == np.argmax(t[:, k:], axis=1)))
  return {name: results[name] for name in (*METRIC_NAMES, *CUB_METRIC_NAMES) if name in results}


# ---------------------------------------------------------------------------------------------
# Report


def _format_value(value) -> str:
  if value is None:
    return "-"
  value = float(value)
  return "nan" if np.isnan(value) else f"{100.0 * value:.1f}"


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """Plain-text table: one row per metric (paper names), one column per setting, values in %.

  Rows follow METRIC_NAMES, then the CUB metrics and any other keys present; a metric missing
  from a column shows "-".
  """
  if not results:
    raise ValueError("format_table needs at least one column of results")
  names = [n for n in (*METRIC_NAMES, *CUB_METRIC_NAMES)
           if any(n in col for col in results.values())]
  for col in results.values():
    names.extend(n for n in col if n not in names)
  headers = [str(h) for h in results]
  cells = [[_format_value(col.get(n)) for col in results.values()] for n in names]
  labels = [DISPLAY_NAMES.get(n, n) for n in names]
  label_w = max(len("metric"), *(len(x) for x in labels))
  widths = [max(len(h), *(len(row[j]) for row in cells)) for j, h in enumerate(headers)]

  def line(label: str, values: list[str]) -> str:
    padded = (v.rjust(w) for v, w in zip(values, widths, strict=True))
    return "  ".join([label.ljust(label_w), *padded])

  out = [line("metric", headers), "  ".join("-" * w for w in [label_w, *widths])]
  out.extend(line(label, row) for label, row in zip(labels, cells, strict=True))
  return "\n".join(out)
