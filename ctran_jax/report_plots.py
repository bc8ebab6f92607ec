"""Plots of the final evaluation: ``eval/report.png`` and the same figure in TensorBoard.

One figure with three panels (`report_figure`):

* left: per-class AP at 0 % known, sorted best first, one labelled bar per class with its AP
  in %, the mAP as a dashed line; classes without positives are grey and marked. With more
  than ``max_bars`` classes only the best and the worst ``keep`` are drawn and the title says
  so;
* top right: mAP against the known percentage, one line per split (the report's ``known``
  section);
* bottom right: precision-recall curves of the best and the worst few classes by AP.

The per-class panels use one split (the evaluator passes the test split, or the eval split
when there is none) and need the scores at 0 % known; without them (0 not among
``config.eval.known_fractions``) those panels say so instead.

Everything except `write` is a pure function of the numbers given. Figures are drawn with
matplotlib's Agg canvas directly (`matplotlib.figure.Figure`, not pyplot), so this works
headless and leaves the global matplotlib backend alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctran_jax import metrics

TB_TAG = "eval/report"
MAX_BARS = 100  # up to this many classes get a bar each
KEEP = 30  # otherwise the best and the worst KEEP
PR_CLASSES = 3  # precision-recall curves of this many best and this many worst classes
NAME_CHARS = 28  # longer label names are shortened in the plots
DPI = 100


class ClassAP(NamedTuple):
  name: str
  ap: float  # 0 when the class has no positives (as in the report's mAP)
  positives: int


def ap_ranking(label_names: Sequence[str], probabilities, labels) -> list[ClassAP]:
  """Per-class AP, best first; classes without positives last (in label order)."""
  ap = metrics.per_class_average_precision(labels, probabilities)
  positives = np.sum(np.asarray(labels) == 1, axis=0)
  if len(label_names) != len(ap):
    raise ValueError(f"{len(label_names)} label names for {len(ap)} classes")
  rows = [ClassAP(str(n), float(a), int(p))
          for n, a, p in zip(label_names, ap, positives, strict=True)]
  return sorted(rows, key=lambda r: (r.positives == 0, -r.ap))


def shown_classes(ranking: Sequence[ClassAP], max_bars: int = MAX_BARS, keep: int = KEEP
                  ) -> tuple[list[ClassAP], list[ClassAP], int]:
  """(best, worst, hidden): all classes in ``best`` when there are at most ``max_bars``,
  else the first and the last ``keep`` of the ranking and the number left out between."""
  if len(ranking) <= max_bars:
    return list(ranking), [], 0
  return list(ranking[:keep]), list(ranking[-keep:]), len(ranking) - 2 * keep


def precision_recall_curve(labels_1d, scores_1d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(precision, recall, thresholds) at each distinct score, highest threshold first.

  Entry i is for predicting ``score >= thresholds[i]``; recall is NaN without positives.
  The non-interpolated AP (`metrics.average_precision`) is sum_i (R_i - R_{i-1}) P_i with
  R_{-1} = 0: the area under the steps the figure draws through the points where recall
  rises.
  """
  scores = np.asarray(scores_1d, dtype=np.float32)  # as the metrics evaluate them
  labels = np.asarray(labels_1d)
  if scores.ndim != 1 or labels.shape != scores.shape or scores.size == 0:
    raise ValueError(f"need two equal non-empty 1-D arrays, got shapes {labels.shape} and "
                     f"{scores.shape}")
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order] == 1
  true_pos = np.cumsum(y, dtype=np.int64)
  predicted = np.arange(1, len(s) + 1)
  last = np.append(s[1:] != s[:-1], True)  # the last entry of each group of equal scores
  true_pos, predicted = true_pos[last], predicted[last]
  total = int(y.sum())
  recall = true_pos / total if total else np.full(true_pos.shape, np.nan)
  return true_pos / predicted, recall, s[last]


def pr_classes(ranking: Sequence[ClassAP], count: int = PR_CLASSES) -> list[ClassAP]:
  """The best and the worst ``count`` classes that have positives (each class once)."""
  rated = [r for r in ranking if r.positives > 0]
  if len(rated) <= 2 * count:
    return rated
  return rated[:count] + rated[-count:]


def known_curves(reports: Mapping[str, dict]) -> dict[str, tuple[list[float], list[float]]]:
  """{split: (known percentages ascending, mAP)} from the reports' ``known`` sections."""
  curves = {}
  for split, report in reports.items():
    keys = sorted(report.get("known", {}), key=float)
    curves[split] = ([float(k) for k in keys], [report["known"][k]["mAP"] for k in keys])
  return curves


# --------------------------------------------------------------------------------- drawing

def _short(name: str) -> str:
  return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def _bars(ax, ranking: list[ClassAP], split: str | None, max_bars: int, keep: int) -> None:
  best, worst, hidden = shown_classes(ranking, max_bars, keep)
  rows = best + ([None] if hidden else []) + worst
  n = len(rows)
  size = 9 if n <= 20 else 8 if n <= 40 else 7
  y = np.arange(n)
  ap = [r.ap * 100 if r else 0.0 for r in rows]
  colors = ["none" if r is None else "tab:blue" if r.positives else "lightgrey" for r in rows]
  ax.barh(y, ap, color=colors, height=0.75)
  names = ["" if r is None else _short(r.name) for r in rows]
  ax.set_yticks(y, names, fontsize=size)
  for i, r in enumerate(rows):
    if r is None:
      ax.text(50, i, f"… {hidden} classes not shown …", ha="center", va="center",
              fontsize=size, style="italic")
    else:
      text = f"{r.ap * 100:.1f}" if r.positives else "no positives"
      ax.text(r.ap * 100 + 1, i, text, va="center", fontsize=size - 1,
              bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
  ax.set_ylim(n - 0.5, -0.5)  # best at the top
  ax.set_xlim(0, 108)
  mean = float(np.mean([r.ap for r in ranking])) * 100
  ax.axvline(mean, color="k", ls="--", lw=1, label=f"mAP {mean:.1f}", zorder=1.5)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_xlabel("AP (%)")
  title = f"per-class AP, {split}, 0% known"
  if hidden:
    title += f"\nbest {len(best)} and worst {len(worst)} of {len(ranking)} classes"
  ax.set_title(title, fontsize=10)
  ax.grid(axis="x", alpha=0.3)


def _known(ax, reports: Mapping[str, dict]) -> None:
  curves = known_curves(reports)
  top = {}  # the highest mAP at each percentage: its value goes above the point, others below
  for x, y in curves.values():
    for xi, yi in zip(x, y, strict=True):
      top[xi] = max(top.get(xi, -np.inf), yi)
  for split, (x, y) in curves.items():
    ax.plot(x, np.asarray(y, dtype=float) * 100, marker="o", label=split)
    for xi, yi in zip(x, y, strict=True):
      ax.annotate(f"{yi * 100:.1f}", (xi, yi * 100), textcoords="offset points",
                  xytext=(0, 5 if yi >= top[xi] else -12), ha="center", fontsize=7)
  ax.margins(y=0.12)  # room for the values
  ax.set_xlabel("labels known (%)")
  ax.set_ylabel("mAP over unknown labels (%)")
  ax.set_title("mAP vs known labels", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)


def _pr(ax, chosen: list[ClassAP], scores, index: Mapping[str, int], split: str) -> None:
  probabilities, labels = scores
  num_best = (len(chosen) + 1) // 2
  for i, r in enumerate(chosen):
    c = index[r.name]
    precision, recall, _ = precision_recall_curve(labels[:, c], probabilities[:, c])
    rises = np.diff(np.append(0.0, recall)) > 0  # the points that add to the AP
    precision, recall = precision[rises], recall[rises]
    ax.step(np.append(0.0, recall), np.append(precision[0], precision), where="pre",
            ls="-" if i < num_best else "--", label=f"{_short(r.name)} (AP {r.ap * 100:.1f})")
  ax.set_xlim(0, 1.01)
  ax.set_ylim(0, 1.03)
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_title(f"precision-recall, {split}, 0% known: best (solid) and worst (dashed)",
               fontsize=10)
  ax.legend(fontsize=7, loc="best")
  ax.grid(alpha=0.3)


def report_figure(reports: Mapping[str, dict], label_names: Sequence[str], scores=None, *,
                  split: str | None = None, title: str = "", max_bars: int = MAX_BARS,
                  keep: int = KEEP) -> Figure:
  """The report figure: per-class AP bars and precision-recall curves of `split` from
  ``scores`` = (probabilities (N, L), labels (N, L)) at 0 % known, and mAP vs known
  fraction for every split in ``reports`` ({split: report as in results.json}).

  Without scores (None) only the mAP panel is drawn, with a note saying why.
  """
  if scores is None:
    figure = Figure(figsize=(8, 5.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    _known(figure.add_subplot(), reports)
    figure.supxlabel("no per-class AP or precision-recall: they need the scores at 0% known "
                     "(0.0 in config.eval.known_fractions)", fontsize=8)
  else:
    ranking = ap_ranking(label_names, *scores)
    bars = len(ranking) if len(ranking) <= max_bars else 2 * keep + 1
    height = max(8.0, 0.2 * bars + 1.5)
    figure = Figure(figsize=(14, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    # The right-hand panels keep a readable height when the bars make the figure tall.
    ratios = [1, 1] if height <= 11 else [5, 5, height - 10]
    grid = figure.add_gridspec(len(ratios), 2, width_ratios=[1, 1.1], height_ratios=ratios)
    _bars(figure.add_subplot(grid[:, 0]), ranking, split, max_bars, keep)
    _known(figure.add_subplot(grid[0, 1]), reports)
    index = {str(n): i for i, n in enumerate(label_names)}
    _pr(figure.add_subplot(grid[1, 1]), pr_classes(ranking), scores, index, split)
  if title:
    figure.suptitle(title, fontsize=12)
  return figure


def figure_array(figure: Figure) -> np.ndarray:
  """The figure rendered as uint8 RGB (H, W, 3)."""
  canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else \
      FigureCanvasAgg(figure)
  canvas.draw()
  return np.array(canvas.buffer_rgba())[..., :3]


def png_bytes(image: np.ndarray) -> bytes:
  """PNG encoding of a uint8 (H, W, 3) image."""
  from PIL import Image  # matplotlib depends on Pillow

  out = io.BytesIO()
  Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out, format="PNG")
  return out.getvalue()


# ------------------------------------------------------------------------------------ output

def write(workdir: str, reports: Mapping[str, dict], label_names: Sequence[str], scores=None,
          *, split: str | None, step: int, title: str = "", writer=None) -> str:
  """Write ``eval/report.png`` (gfile, so gs:// workdirs work) and, with a metric writer,
  the same image as TensorBoard image `TB_TAG` at `step`; returns the PNG's path."""
  from tensorflow.io import gfile

  image = figure_array(report_figure(reports, label_names, scores, split=split, title=title))
  path = os.path.join(workdir, "eval", "report.png")
  gfile.makedirs(os.path.dirname(path))
  with gfile.GFile(path, "wb") as f:
    f.write(png_bytes(image))
  if writer is not None:
    writer.write_images(step, {TB_TAG: image[None]})
  return path
