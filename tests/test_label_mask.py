"""Label-mask sampling: the reference's known-count law, determinism, eval masks per example."""

import numpy as np
import pytest

from ctran_jax import label_mask


def _labels(n, num_labels, seed=0):
  return (np.random.default_rng(seed).random((n, num_labels)) < 0.3).astype(np.int32)


def test_train_known_count_is_uniform_over_zero_to_floor_three_quarters():
  n, num_labels = 40_000, 10                      # floor(0.75 * 10) = 7 -> 8 equally likely counts
  states = label_mask.train_states(_labels(n, num_labels), np.arange(n), step=3, seed=0)
  counts = np.sum(states != label_mask.UNKNOWN, axis=1)
  assert counts.min() == 0 and counts.max() == 7
  freq = np.bincount(counts, minlength=8) / n
  np.testing.assert_allclose(freq, 1 / 8, atol=0.01)


def test_train_known_set_is_uniform_over_labels_and_shows_true_state():
  n, num_labels = 20_000, 12
  labels = _labels(n, num_labels)
  states = label_mask.train_states(labels, np.arange(n), step=0, seed=1)
  known = states != label_mask.UNKNOWN
  np.testing.assert_array_equal(states[known], labels[known])
  per_label = known.mean(axis=0)                  # E = E[count] / L = (9 / 2) / 12 = 0.375
  np.testing.assert_allclose(per_label, 4.5 / 12, atol=0.02)


@pytest.mark.parametrize("num_labels,upper", [(80, 60), (20, 15), (3, 2), (1, 0)])
def test_train_bounds_follow_the_reference_integer_rule(num_labels, upper):
  assert label_mask.max_known_labels(num_labels, 0.75) == upper
  n = 5_000
  counts = np.sum(label_mask.train_states(_labels(n, num_labels), np.arange(n), step=0,
                                          seed=0) != -1, axis=1)
  assert counts.max() == upper and counts.min() == 0


def test_train_states_are_deterministic_per_seed_step_and_example():
  labels, ids = _labels(64, 20), np.arange(1000, 1064)
  a = label_mask.train_states(labels, ids, step=7, seed=0)
  np.testing.assert_array_equal(a, label_mask.train_states(labels, ids, step=7, seed=0))
  # Independent of the batch an example sits in (order, batch size, host).
  perm = np.random.default_rng(0).permutation(64)
  np.testing.assert_array_equal(a[perm], label_mask.train_states(labels[perm], ids[perm],
                                                                 step=7, seed=0))
  np.testing.assert_array_equal(a[:5], label_mask.train_states(labels[:5], ids[:5], step=7,
                                                               seed=0))
  assert (a != label_mask.train_states(labels, ids, step=8, seed=0)).any()
  assert (a != label_mask.train_states(labels, ids, step=7, seed=1)).any()


def test_eval_states_depend_only_on_example_and_nest_across_fractions():
  labels, ids = _labels(200, 80), np.arange(200) * 7919
  masks = {f: label_mask.eval_states(labels, ids, known_fraction=f, seed=0)
           for f in (0.0, 0.25, 0.5, 0.75)}
  for f, states in masks.items():
    np.testing.assert_array_equal(np.sum(states != -1, axis=1), int(f * 80))
  assert (masks[0.0] == -1).all()
  assert ((masks[0.25] != -1) <= (masks[0.5] != -1)).all()
  assert ((masks[0.5] != -1) <= (masks[0.75] != -1)).all()
  half = label_mask.eval_states(labels[100:], ids[100:], known_fraction=0.5, seed=0)
  np.testing.assert_array_equal(half, masks[0.5][100:])
  # Different examples get different known sets.
  assert len({tuple(np.flatnonzero(r != -1)) for r in masks[0.5]}) > 190


def test_eval_fraction_out_of_range_is_an_error():
  with pytest.raises(ValueError, match="known_fraction"):
    label_mask.eval_states(_labels(2, 4), [0, 1], known_fraction=1.5)


def test_only_the_maskable_prefix_is_ever_known():
  n, concepts, classes = 5_000, 12, 5              # CUB: concepts may be known, classes never
  labels = _labels(n, concepts + classes)
  states = label_mask.train_states(labels, np.arange(n), step=0, seed=0,
                                   num_maskable=concepts)
  assert (states[:, concepts:] == label_mask.UNKNOWN).all()
  counts = np.sum(states[:, :concepts] != label_mask.UNKNOWN, axis=1)
  assert counts.min() == 0 and counts.max() == 9   # floor(0.75 * 12), not of 17
  # num_maskable=0 is the unrestricted rule, and equals num_maskable=L.
  np.testing.assert_array_equal(
      label_mask.train_states(labels, np.arange(n), step=0, seed=0),
      label_mask.train_states(labels, np.arange(n), step=0, seed=0, num_maskable=17))
  with pytest.raises(ValueError, match="num_maskable"):
    label_mask.train_states(labels, np.arange(n), step=0, seed=0, num_maskable=18)


def test_extra_label_states_give_whole_visible_groups_nested_by_count():
  groups = np.array([0, 0, 1, 1, 1, 2, 3, 3])      # 8 concepts in 4 groups, then 3 classes
  labels = _labels(50, 11, seed=3)
  visible = np.random.default_rng(1).random((50, 11)) < 0.8
  order = label_mask.group_order(4, seed=0)
  assert sorted(order) == [0, 1, 2, 3]
  known_sets = []
  for n in range(5):
    states = label_mask.extra_label_states(labels, visible, concept_groups=groups,
                                           num_known_groups=n, num_groups=4, seed=0)
    expected_known = np.isin(groups, order[:n])[None] & visible[:, :8]
    np.testing.assert_array_equal(states[:, :8] != -1, expected_known)
    np.testing.assert_array_equal(states[:, :8][expected_known], labels[:, :8][expected_known])
    assert (states[:, 8:] == -1).all()
    known_sets.append(states != -1)
  for a, b in zip(known_sets, known_sets[1:], strict=False):
    assert (a <= b).all()
  assert not known_sets[0].any()
  with pytest.raises(ValueError, match="num_known_groups"):
    label_mask.extra_label_states(labels, visible, concept_groups=groups, num_known_groups=5,
                                  num_groups=4)


def test_all_unknown_mixture_keeps_the_reference_law_for_the_rest():
  n, num_labels = 40_000, 10
  labels, ids = _labels(n, num_labels), np.arange(n)
  reference = label_mask.train_states(labels, ids, step=3, seed=0)
  np.testing.assert_array_equal(
      reference, label_mask.train_states(labels, ids, step=3, seed=0, all_unknown_fraction=0.0))
  mixed = label_mask.train_states(labels, ids, step=3, seed=0, all_unknown_fraction=0.5)
  shown = np.any(mixed != label_mask.UNKNOWN, axis=1)
  # Examples not hit by the coin keep their reference states exactly; the others show none.
  np.testing.assert_array_equal(mixed[shown], reference[shown])
  counts = np.sum(mixed != label_mask.UNKNOWN, axis=1)
  # P(no label) = 0.5 + 0.5 * 1/8; every other count keeps half its reference share.
  freq = np.bincount(counts, minlength=8) / n
  np.testing.assert_allclose(freq, [0.5 + 0.5 / 8] + [0.5 / 8] * 7, atol=0.01)
  assert not np.any(label_mask.train_states(labels, ids, step=3, seed=0,
                                            all_unknown_fraction=1.0) != label_mask.UNKNOWN)
  with pytest.raises(ValueError, match="all_unknown_fraction"):
    label_mask.train_states(labels, ids, step=3, seed=0, all_unknown_fraction=1.5)
