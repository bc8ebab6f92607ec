"""Metrics equal the reference's golden values (cases A-F) and small hand-computed examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctran_jax import metrics as M

PARITY = Path(__file__).parent / "data" / "parity"
ATOL = 1e-7
ATOL_EBF1 = 1e-6

# case -> (probs key, targets key, label_states key or None for all unknown, num_concepts)
CASES = {
  "A_coco_allunk": ("coco", "coco_targets", None, None),
  "B_coco_partial": ("coco", "coco_targets", "coco_mask", None),
  "C_coco_emptyclass": ("coco", "coco_empty_targets", None, None),
  "D_coco_emptyclass_partial": ("coco", "coco_empty_targets", "coco_mask", None),
  "E_cub_allunk": ("cub", "cub_targets", None, 112),
  "F_coco_easy_allunk": ("coco_easy", "coco_targets", None, None),
}


@pytest.fixture(scope="module")
def golden():
  with np.load(PARITY / "metrics_golden.npz") as data:
    return {k: data[k] for k in data.files}


def _inputs(golden, case, probs_from_logits=False):
  prefix, targets_key, states_key, num_concepts = CASES[case]
  probs = (M.sigmoid(golden[f"{prefix}_logits"]) if probs_from_logits
           else golden[f"{prefix}_probs"])
  targets = golden[targets_key]
  states = (np.full(targets.shape, -1.0, np.float32) if states_key is None
            else golden[states_key])
  return probs, targets, states, num_concepts


def _expected(golden, case):
  prefix = f"{case}__"
  return {k[len(prefix):]: float(v) for k, v in golden.items()
          if k.startswith(prefix) and v.ndim == 0}


def _check(result, expected):
  assert set(result) == set(expected)
  for name, want in expected.items():
    atol = ATOL_EBF1 if name == "ebF1" else ATOL
    assert isinstance(result[name], float), name
    assert abs(result[name] - want) <= atol, (name, result[name], want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_metrics(golden, case):
  probs, targets, states, num_concepts = _inputs(golden, case)
  _check(M.compute_metrics(probs, targets, states, num_concepts=num_concepts),
         _expected(golden, case))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_metrics_from_own_sigmoid(golden, case):
  # Our float32 sigmoid may differ from torch's in the last bit; the metrics must not.
  probs, targets, states, num_concepts = _inputs(golden, case, probs_from_logits=True)
  _check(M.compute_metrics(probs, targets, states, num_concepts=num_concepts),
         _expected(golden, case))


def test_golden_per_class_ap(golden):
  ap = M.per_class_average_precision(golden["coco_targets"], golden["coco_probs"])
  np.testing.assert_allclose(ap, golden["A_coco_allunk__AP_per_class"], rtol=0, atol=ATOL)
  for c in (0, 41, 79):
    assert M.average_precision(golden["coco_targets"][:, c], golden["coco_probs"][:, c]) == (
      pytest.approx(golden["A_coco_allunk__AP_per_class"][c], abs=ATOL))


def test_golden_mean_average_precision_entry_point(golden):
  probs, targets, states, _ = _inputs(golden, "D_coco_emptyclass_partial")
  assert M.mean_average_precision(targets, probs, states) == pytest.approx(
    float(golden["D_coco_emptyclass_partial__mAP"]), abs=ATOL)
  # No states, or all unknown -> plain macro mAP (empty class counted as 0).
  want_c = float(golden["C_coco_emptyclass__mAP"])
  assert M.mean_average_precision(targets, probs) == pytest.approx(want_c, abs=ATOL)
  assert M.mean_average_precision(targets, probs, np.full(targets.shape, -1)) == pytest.approx(
    want_c, abs=ATOL)


def test_sigmoid_stable_and_close_to_torch(golden):
  with np.errstate(over="raise", invalid="raise", divide="raise"):
    out = M.sigmoid(np.array([-1e4, -100.0, 0.0, 100.0, 1e4]))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[[2, 3, 4]], [0.5, 1.0, 1.0])
  assert 0.0 <= out[0] <= out[1] < 1e-40
  ours = M.sigmoid(golden["cub_logits"])
  ulps = np.abs(ours.view(np.int32).astype(np.int64) - golden["cub_probs"].view(np.int32))
  assert ulps.max() <= 1


# ---------------------------------------------------------------------------------------------
# Hand-computed examples


def test_average_precision_groups_ties():
  # Thresholds 0.9: P=1, R=1/3; 0.8 (tie of a negative and a positive): P=2/3, R=2/3;
  # 0.5: P=3/4, R=1 -> AP = (1 + 2/3 + 3/4) / 3 = 29/36. Ungrouped ties would give 11/12.
  scores = [0.9, 0.8, 0.8, 0.5, 0.3]
  targets = [1, 0, 1, 1, 0]
  assert M.average_precision(targets, scores) == pytest.approx(29 / 36, abs=1e-12)
  assert M.average_precision(targets[::-1], scores[::-1]) == pytest.approx(29 / 36, abs=1e-12)
  assert M.average_precision([1, 1, 0], [0.2, 0.2, 0.2]) == pytest.approx(2 / 3, abs=1e-12)
  assert M.average_precision([0, 0, 0], [0.1, 0.5, 0.9]) == 0.0
  assert M.average_precision([1, 0, 0], [0.9, 0.5, 0.1]) == 1.0


PROBS = np.array([[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.3, 0.4, 0.5], [0.1, 0.6, 0.7]])
TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])


def test_mean_average_precision_plain():
  # Class APs: 0 -> (1 + 2/3) / 2 = 5/6, 1 -> 1, 2 -> (1 + 2/3) / 2 = 5/6.
  assert M.mean_average_precision(TARGETS, PROBS) == pytest.approx(8 / 9, abs=1e-12)


def test_mean_average_precision_masked_skips_class():
  states = np.full(TARGETS.shape, -1)
  states[0, 0] = 1  # class 0 over rows 1-3: scores .8(-) .3(+) .1(-) -> AP 1/2
  states[1, 1] = 1  # class 1's only positive is known -> class skipped (not counted as 0)
  # class 2 all unknown -> 5/6.
  assert M.mean_average_precision(TARGETS, PROBS, states) == pytest.approx(2 / 3, abs=1e-12)
  # Every entry of a class known -> skipped as well.
  states[:, 2] = TARGETS[:, 2]
  assert M.mean_average_precision(TARGETS, PROBS, states) == pytest.approx(1 / 2, abs=1e-12)
  # Nothing left anywhere -> NaN.
  assert np.isnan(M.mean_average_precision(TARGETS, PROBS, TARGETS))


def test_thresholded_metrics_by_hand():
  probs = np.array([[0.5, 0.2], [0.4, 0.1], [0.9, 0.8]], np.float32)  # 0.5 is a positive
  targets = np.array([[1, 1], [0, 0], [1, 0]])
  r = M.compute_metrics(probs, targets)
  assert list(r) == list(M.METRIC_NAMES)
  # Class 0: tp 2 / pred 2 / pos 2; class 1: tp 0 / pred 1 / pos 1.
  expected = {"CP": 0.5, "CR": 0.5, "CF1": 0.5, "OP": 2 / 3, "OR": 2 / 3, "OF1": 2 / 3,
              "ACC": 1 / 3, "HA": 2 / 3,
              "ebF1": 2 / 3}  # rows 0 and 2 give 2/3 each; row 1 (nothing) is skipped
  for name, want in expected.items():
    assert r[name] == pytest.approx(want, abs=1e-7), name
    # Fewer than 3 labels: top-3 keeps everything, so it equals the plain metric.
    if name[1:] in ("P", "R", "F1"):
      assert r[f"{name}_top3"] == pytest.approx(want, abs=1e-7), name


def test_never_predicted_and_empty_classes_count_as_zero():
  probs = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.7]])
  targets = np.array([[1, 1, 0], [1, 0, 0]])
  r = M.compute_metrics(probs, targets)
  # Precision: class 0 -> 1, class 1 never predicted -> 0, class 2 -> 0/1.
  assert r["CP"] == pytest.approx(1 / 3)
  # Recall: class 0 -> 1, class 1 -> 0, class 2 has no positives -> 0.
  assert r["CR"] == pytest.approx(1 / 3)
  assert r["OP"] == pytest.approx(2 / 3) and r["OR"] == pytest.approx(2 / 3)
  nothing = M.compute_metrics(np.zeros((2, 3)), np.zeros((2, 3)))
  for name in ("CP", "CR", "CF1", "OP", "OR", "OF1", "ebF1", "mAP"):
    assert nothing[name] == 0.0, name
  assert nothing["ACC"] == 1.0 and nothing["HA"] == 1.0


def test_top3_keeps_ties_and_threshold():
  probs = np.array([[0.9, 0.8, 0.7, 0.7, 0.6, 0.4],    # tie at the 3rd place -> 4 kept
                    [0.9, 0.55, 0.45, 0.3, 0.2, 0.1],  # 3rd largest < 0.5 -> only 2
                    [0.6, 0.6, 0.6, 0.6, 0.1, 0.0]],   # all tied -> 4
                   np.float32)
  want = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(M.top_k_predictions(probs), want)
  targets = np.array([[1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
  r = M.compute_metrics(probs, targets)
  # tp 2 + 1 + 0 out of 4 + 2 + 4 predicted and 3 + 1 + 1 positives.
  assert r["OP_top3"] == pytest.approx(3 / 10) and r["OR_top3"] == pytest.approx(3 / 5)
  assert r["OF1_top3"] == pytest.approx(2 * 0.3 * 0.6 / 0.9)


def test_cub_concept_and_class_accuracy():
  probs = np.array([[0.9, 0.2, 0.1, 0.7, 0.2], [0.3, 0.6, 0.5, 0.4, 0.1],
                    [0.8, 0.9, 0.3, 0.2, 0.6]])
  targets = np.array([[1, 0, 0, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 1]])
  r = M.compute_metrics(probs, targets, num_concepts=2)
  # Concept 0: 2/3 correct, concept 1: 2/3 -> 2/3. Classes (cols 2-4): argmax 1, 0, 2 vs 1, 0, 2.
  assert r["concept_acc"] == pytest.approx(2 / 3)
  assert r["class_acc"] == 1.0
  assert list(r) == [*M.METRIC_NAMES, "concept_acc", "class_acc"]
  for bad in (0, 5, 2.5):
    with pytest.raises(ValueError, match="num_concepts"):
      M.compute_metrics(probs, targets, num_concepts=bad)


def _brute_force_ap(targets, scores):
  """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, one at a time (O(n^2))."""
  n_pos = targets.sum()
  if n_pos == 0:
    return 0.0
  ap, prev_recall = 0.0, 0.0
  for thr in np.unique(scores)[::-1]:
    pred = scores >= thr
    tp = (pred & (targets == 1)).sum()
    recall = tp / n_pos
    ap += (recall - prev_recall) * tp / pred.sum()
    prev_recall = recall
  return ap


def test_random_against_brute_force():
  rng = np.random.default_rng(0)
  probs = (rng.integers(0, 12, size=(60, 9)) / 11).astype(np.float32)  # many ties
  targets = (rng.random((60, 9)) < 0.3).astype(np.int64)
  targets[:, 3] = 0  # an empty class
  states = np.where(rng.random((60, 9)) < 0.4, targets, -1)
  plain = [_brute_force_ap(targets[:, c], probs[:, c]) for c in range(9)]
  np.testing.assert_allclose(M.per_class_average_precision(targets, probs), plain, atol=1e-12)
  assert M.mean_average_precision(targets, probs) == pytest.approx(np.mean(plain), abs=1e-12)
  masked = []
  for c in range(9):
    keep = states[:, c] == -1
    if keep.any() and targets[keep, c].any():
      masked.append(_brute_force_ap(targets[keep, c], probs[keep, c]))
  assert M.mean_average_precision(targets, probs, states) == pytest.approx(np.mean(masked),
                                                                           abs=1e-12)


def test_large_input_random_scores_give_ap_near_positive_rate():
  # Speed is measured in benchmarks, not asserted here; this checks the chunked AP path.
  rng = np.random.default_rng(1)
  probs = rng.random((40_000, 80), dtype=np.float32)
  targets = rng.random((40_000, 80)) < 0.05
  r = M.compute_metrics(probs, targets)
  assert r["mAP"] == pytest.approx(0.05, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Validation and report


@pytest.mark.parametrize("probs, targets, states, match", [
  (np.zeros((3, 4)), np.zeros((3, 5)), None, "shape"),
  (np.zeros((3, 4)), np.zeros((4, 3)), None, "shape"),
  (np.zeros(4), np.zeros(4), None, "2-D"),
  (np.zeros((3, 4)), np.full((3, 4), 2), None, "0 and 1"),
  (np.full((3, 4), np.nan), np.zeros((3, 4)), None, "NaN"),
  (np.zeros((0, 4)), np.zeros((0, 4)), None, "at least one"),
  (np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 3)), "label_states shape"),
  (np.zeros((3, 4)), np.zeros((3, 4)), np.full((3, 4), 2), "label_states"),
])
def test_invalid_inputs_raise(probs, targets, states, match):
  with pytest.raises(ValueError, match=match):
    M.compute_metrics(probs, targets, states)
  with pytest.raises(ValueError, match=match):
    M.mean_average_precision(targets, probs, states)


def test_average_precision_validates():
  with pytest.raises(ValueError, match="shape"):
    M.average_precision([1, 0], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="1-D"):
    M.average_precision([[1, 0]], [[0.1, 0.2]])


def test_format_table(golden):
  probs, targets, states, _ = _inputs(golden, "B_coco_partial")
  results = {"known 0%": M.compute_metrics(probs, targets),
             "known 30%": M.compute_metrics(probs, targets, states)}
  table = M.format_table(results)
  lines = table.splitlines()
  assert len(lines) == 2 + len(M.METRIC_NAMES)
  assert len({len(line) for line in lines}) == 1  # aligned columns
  assert "known 0%" in lines[0] and "known 30%" in lines[0]
  for name in M.METRIC_NAMES:
    assert any(line.startswith(M.DISPLAY_NAMES[name] + " ") for line in lines), name
  row = {line.split("  ")[0].strip(): line.split() for line in lines[2:]}
  assert row["mAP"][-2:] == ["67.4", "67.4"]  # reference prints mAP 67.4 for A and B
  assert row["CF1"][-2:] == ["62.3", "62.3"]
  assert row["OP (top-3)"][-2:] == ["90.5", "90.5"]
  # CUB extras appear as extra rows; a missing value shows "-".
  cub = M.format_table({"a": {"mAP": 0.5, "class_acc": 0.424}, "b": {"mAP": float("nan")}})
  assert "Class acc" in cub and "42.4" in cub and "nan" in cub and " -" in cub
  with pytest.raises(ValueError):
    M.format_table({})


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_class_thresholds_at_one_half_give_the_reference_metrics(golden, case):
  probs, targets, _, _ = _inputs(golden, case)
  at_half = M.thresholded_metrics(probs, targets, np.full(probs.shape[1], 0.5))
  reference = M.compute_metrics(probs, targets)
  assert at_half == {k: reference[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")}
  # A per-class rule: class 0 never fires at threshold 1.1, the others as before.
  moved = M.thresholded_metrics(probs, targets, [1.1] + [0.5] * (probs.shape[1] - 1))
  assert moved != at_half
