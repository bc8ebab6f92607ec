"""The evaluation report figure: the data it plots, the PNG, and its place in a training run."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ctran_jax import metrics, report_plots

NAMES = ["perfect", "good", "random", "inverted", "rare"]


def reports(map0=0.6):
  return {split: {"num_examples": 40,
                  "known": {k: {"mAP": map0 + 0.1 * i + (0.05 if split == "test" else 0)}
                            for i, k in enumerate(["0", "25", "50", "75"])}}
          for split in ("validation", "test")}


def scores(seed=0, n=40):
  """5 classes: perfect, noisy but informative, random, inverted, one positive (AP 0.5)."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, 5)) < 0.4).astype(np.int32)
  labels[:, 4] = 0
  labels[3, 4] = 1
  labels[:2, :4] = [[1, 1, 1, 1], [0, 0, 0, 0]]  # every class has positives and negatives
  probs = rng.random((n, 5))
  probs[:, 0] = 0.2 + 0.6 * labels[:, 0]
  probs[:, 1] = 0.6 * labels[:, 1] + 0.8 * rng.random(n)
  probs[:, 3] = np.where(labels[:, 3] == 1, 0.1, 0.6) + 0.3 * rng.random(n)  # all last
  probs[:, 4] = np.where(labels[:, 4] == 1, 0.95, np.linspace(0.0, 0.9, n))
  probs[-1, 4] = 0.99  # the rare positive is ranked second: AP 0.5
  return probs.astype(np.float32), labels


def png(**kwargs):
  args = {"reports": reports(), "label_names": NAMES, "scores": scores(), "split": "test",
          "title": "toy @ step 1", **kwargs}
  return report_plots.png_bytes(report_plots.figure_array(report_plots.report_figure(**args)))


def test_ranking_puts_the_perfect_class_first_and_matches_the_metrics():
  probs, labels = scores()
  ranking = report_plots.ap_ranking(NAMES, probs, labels)
  assert ranking[0] == ("perfect", 1.0, int(labels[:, 0].sum()))
  assert [r.name for r in ranking] == ["perfect", "good", "rare", "random", "inverted"]
  assert ranking[2].ap == pytest.approx(0.5)
  aps = dict((r.name, r.ap) for r in ranking)
  expected = metrics.per_class_average_precision(labels, probs)
  assert [aps[n] for n in NAMES] == pytest.approx(list(expected))
  # A class without positives goes last whatever its AP (0 by the metrics' convention).
  labels[:, 2] = 0
  assert report_plots.ap_ranking(NAMES, probs, labels)[-1].name == "random"
  chosen = report_plots.pr_classes(report_plots.ap_ranking(NAMES, probs, labels), count=1)
  assert [r.name for r in chosen] == ["perfect", "inverted"]


def test_png_is_valid_and_changes_with_the_metrics():
  first = png()
  image = Image.open(io.BytesIO(first))
  assert image.format == "PNG" and image.mode == "RGB"
  width, height = image.size
  assert 1000 <= width <= 2000 and 600 <= height <= 2000
  assert png() == first  # deterministic, so a difference below is the metrics'
  probs, labels = scores()
  probs[:, 2] = labels[:, 2]  # the random class becomes perfect
  changed = np.asarray(Image.open(io.BytesIO(png(scores=(probs, labels)))))
  assert changed.shape == np.asarray(image).shape
  assert np.mean(np.any(changed != np.asarray(image), axis=-1)) > 0.001
  assert png(reports=reports(map0=0.3)) != first


def brute_force_pr(labels, scores_1d):
  rows = []
  for t in sorted(set(scores_1d.tolist()), reverse=True):
    predicted = scores_1d >= t
    tp = np.sum(predicted & (labels == 1))
    rows.append((tp / predicted.sum(), tp / labels.sum(), t))
  return np.array(rows).T


def test_precision_recall_curve_matches_brute_force_and_its_area_is_the_ap():
  labels = np.array([1, 0, 1, 1, 0, 0, 1, 0])
  s = np.array([0.9, 0.8, 0.8, 0.5, 0.5, 0.3, 0.1, 0.1], np.float32)  # ties across labels
  precision, recall, thresholds = report_plots.precision_recall_curve(labels, s)
  np.testing.assert_allclose(np.stack([precision, recall, thresholds]),
                             brute_force_pr(labels, s))
  rng = np.random.default_rng(1)
  for _ in range(5):
    y = (rng.random(50) < 0.3).astype(int)
    y[0] = 1
    x = np.round(rng.random(50), 1).astype(np.float32)
    p, r, _ = report_plots.precision_recall_curve(y, x)
    np.testing.assert_allclose(np.stack([p, r]), brute_force_pr(y, x)[:2])
    area = np.sum(np.diff(np.append(0.0, r)) * p)
    assert area == pytest.approx(metrics.average_precision(y, x))
  _, recall, _ = report_plots.precision_recall_curve(np.zeros(3), np.ones(3))
  assert np.isnan(recall).all()


def test_many_labels_show_the_best_and_worst_and_say_so():
  rng = np.random.default_rng(0)
  labels = (rng.random((60, 300)) < 0.3).astype(np.int32)
  probs = np.clip(labels * rng.random(300) + rng.random((60, 300)) * 0.5, 0, 1)
  names = [f"class {i}" for i in range(300)]
  ranking = report_plots.ap_ranking(names, probs, labels)
  best, worst, hidden = report_plots.shown_classes(ranking, max_bars=100, keep=30)
  assert (best, worst, hidden) == (ranking[:30], ranking[-30:], 240)
  figure = report_plots.report_figure(reports(), names, (probs, labels), split="test")
  assert "best 30 and worst 30 of 300 classes" in figure.axes[0].get_title()
  height, width, channels = report_plots.figure_array(figure).shape
  assert channels == 3 and height < 2000
  assert report_plots.shown_classes(ranking[:80])[1:] == ([], 0)  # 80 labels: all shown


def test_without_scores_only_the_map_panel_is_drawn():
  figure = report_plots.report_figure(reports(), NAMES, None)
  assert len(figure.axes) == 1 and figure.axes[0].get_title() == "mAP vs known labels"
  x, y = report_plots.known_curves({"test": {"known": {"50": {"mAP": 0.5},
                                                        "0": {"mAP": 0.3}}}})["test"]
  assert (x, y) == ([0.0, 50.0], [0.3, 0.5])


class FakeWriter:
  def __init__(self):
    self.images = []

  def write_images(self, step, images):
    self.images.append((step, images))


def test_write_saves_the_png_and_sends_the_same_image_to_the_writer(tmp_path):
  writer = FakeWriter()
  path = report_plots.write(str(tmp_path), reports(), NAMES, scores(), split="test", step=7,
                            writer=writer)
  assert path == str(tmp_path / "eval" / "report.png")
  [(step, images)] = writer.images
  assert step == 7 and list(images) == [report_plots.TB_TAG]
  array = images[report_plots.TB_TAG]
  assert array.dtype == np.uint8 and array.ndim == 4 and array.shape[0] == 1
  np.testing.assert_array_equal(np.asarray(Image.open(path)), array[0])


def test_final_report_plots_the_test_split_else_the_eval_split(tmp_path):
  """`Evaluator._write_plots` (called by `final_report` on process 0), without a model."""
  from types import SimpleNamespace

  from ctran_jax import evaluate

  for test_split, expected in (("test", "test"), ("", "validation")):
    writer = FakeWriter()
    fake = SimpleNamespace(
        config=SimpleNamespace(data=SimpleNamespace(eval_split="validation",
                                                    test_split=test_split)),
        workdir=str(tmp_path / expected), meta=SimpleNamespace(name="toy", label_names=NAMES),
        _scores={("validation", 3): None, (expected, 3): scores()}, writer=writer)
    evaluate.Evaluator._write_plots(fake, reports(), 3)
    assert os.path.exists(tmp_path / expected / "eval" / "report.png")
    assert [(step, list(images)) for step, images in writer.images] == \
        [(3, [report_plots.TB_TAG])]
