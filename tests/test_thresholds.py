"""Per-class thresholds: the fitted threshold reaches the best F1 a brute-force search finds."""

import numpy as np
import pytest

from ctran_jax import thresholds


def f1_at(scores, targets, t):
  pred = scores >= t
  tp = np.sum(pred & targets)
  return 2 * tp / (pred.sum() + targets.sum()) if targets.any() else 0.0


def brute_force_best_f1(scores, targets):
  cuts = np.concatenate([np.unique(scores), [np.inf]])
  return max(f1_at(scores, targets, t) for t in cuts)


@pytest.mark.parametrize("seed", range(5))
def test_fitted_thresholds_reach_the_brute_force_best_f1(seed):
  rng = np.random.default_rng(seed)
  n, num_labels = 200, 6
  targets = rng.random((n, num_labels)) < rng.uniform(0.05, 0.5, num_labels)
  # Scores that carry signal, with ties (rounded) to exercise the tie rule.
  scores = np.round(np.clip(0.3 * targets + rng.normal(0.35, 0.2, (n, num_labels)), 0, 1), 2)
  fitted = thresholds.fit(scores, targets)
  assert fitted.shape == (num_labels,)
  for i in range(num_labels):
    best = brute_force_best_f1(scores[:, i], targets[:, i])
    assert f1_at(scores[:, i], targets[:, i], fitted[i]) == pytest.approx(best, abs=1e-12)


def test_constructed_scores_give_the_separating_threshold():
  scores = np.array([[0.9], [0.8], [0.6], [0.3], [0.2]])
  targets = np.array([[1], [1], [1], [0], [0]], bool)
  (t,) = thresholds.fit(scores, targets)
  assert t == pytest.approx(0.45)  # midway between the last positive and the first negative


def test_a_class_without_positives_keeps_one_half():
  scores = np.array([[0.9, 0.1], [0.2, 0.8]])
  targets = np.array([[0, 1], [0, 1]], bool)
  fitted = thresholds.fit(scores, targets)
  assert fitted[0] == 0.5
  assert fitted[1] <= 0.1  # both positives predicted


def test_save_and_load_round_trip_and_refuse_other_files(tmp_path):
  path = str(tmp_path / "thresholds.json")
  thresholds.save(path, [0.25, 0.5], fitted_on="validation", step=7)
  doc = thresholds.load(path)
  assert doc["thresholds"] == [0.25, 0.5] and doc["fitted_on"] == "validation"
  assert doc["step"] == 7
  (tmp_path / "other.json").write_text('{"format": "something/else"}')
  with pytest.raises(ValueError, match="not a thresholds file"):
    thresholds.load(str(tmp_path / "other.json"))
  with pytest.raises(ValueError, match="same"):
    thresholds.fit(np.zeros((3, 2)), np.zeros((3, 3)))
