"""Ternary label states for label-mask training (LMT) and partial-label evaluation.

A state is -1 (unknown), 0 (known negative) or 1 (known positive); the model adds the state
embedding ``state + 1``. Which labels are known is a pure function of
``(seed, step, example_id)`` in training and of ``(seed, example_id)`` in evaluation, computed
with a counter-based hash on the host. So a resumed run sees the same masks, and evaluation
masks do not depend on batch size, device count or host count (the reference seeds Python's
``random`` from OS entropy in training and from a SHA-1 of the image tensor at test time).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctran_jax.config_util import check_range

UNKNOWN = -1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a well-mixed 64-bit hash of each uint64 entry."""
  with np.errstate(over="ignore"):
    x = (x + _GOLDEN).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(*parts) -> np.ndarray:
  """Hash a tuple of integer arrays (broadcast together) into uint64 values."""
  h = np.zeros((), np.uint64)
  with np.errstate(over="ignore"):
    for part in parts:
      h = _splitmix64(h ^ np.asarray(part).astype(np.uint64))
  return h


def _uniform(*parts) -> np.ndarray:
  """Uniform [0, 1) floats from the hash (53 random bits)."""
  return (_hash(*parts) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _known_subset(scores: np.ndarray, num_known: np.ndarray) -> np.ndarray:
  """Known = the `num_known` labels with the smallest scores (a uniform subset of that size)."""
  ranks = np.argsort(np.argsort(scores, axis=-1, kind="stable"), axis=-1, kind="stable")
  return ranks < np.asarray(num_known)[..., None]


def states_from_known(labels, known) -> np.ndarray:
  """States: the label (0/1) where known, -1 elsewhere."""
  return np.where(known, np.asarray(labels), UNKNOWN).astype(np.int32)


def max_known_labels(num_labels: int, max_known_fraction: float) -> int:
  """floor(fraction * L): the reference's upper bound (inclusive) on known labels."""
  return int(max_known_fraction * num_labels)


_TRAIN, _EVAL = 1, 2  # stream tags, so train and eval masks never share hash inputs


_ALL_UNKNOWN = 4  # stream tag of the "this example shows no label" coin


def train_states(labels, example_ids, *, step: int, seed: int,
                 max_known_fraction: float = 0.75, num_maskable: int = 0,
                 all_unknown_fraction: float = 0.0) -> np.ndarray:
  """LMT states for a training batch (the reference rule, made deterministic).

  Per example: the number of known labels is uniform over 0..floor(f * M) inclusive and the
  known set is a uniform random subset of that size of the first M labels; known labels show
  their true state.  M = ``num_maskable`` (0: all L labels); labels past M are always
  unknown (CUB: the 112 concepts can be revealed, the 200 class labels never).

  ``all_unknown_fraction`` p mixes in regular inference: each example, by its own coin,
  shows no label with probability p and follows the rule above otherwise (p = 0 is the
  reference law, unchanged draw for draw; the coin is a separate hash stream).
  """
  if not 0.0 <= all_unknown_fraction <= 1.0:
    raise ValueError(f"all_unknown_fraction must be in [0, 1], got {all_unknown_fraction}")
  labels = np.asarray(labels)
  ids = np.asarray(example_ids).astype(np.uint64)[:, None]
  num_labels = labels.shape[-1]
  maskable = num_maskable or num_labels
  if not 0 < maskable <= num_labels:
    raise ValueError(f"num_maskable must be in [0, {num_labels}], got {num_maskable}")
  upper = max_known_labels(maskable, max_known_fraction)
  count_u = _uniform(_TRAIN, seed, step, ids, maskable)[:, 0]
  num_known = np.minimum((count_u * (upper + 1)).astype(np.int64), upper)
  if all_unknown_fraction > 0:
    coin = _uniform(_ALL_UNKNOWN, seed, step, ids)[:, 0]
    num_known = np.where(coin < all_unknown_fraction, 0, num_known)
  scores = _uniform(_TRAIN, seed, step, ids, np.arange(maskable, dtype=np.uint64))
  known = _known_subset(scores, num_known)
  if maskable < num_labels:
    known = np.concatenate([known, np.zeros((known.shape[0], num_labels - maskable), bool)], -1)
  return states_from_known(labels, known)


def training_states(config) -> Callable[..., np.ndarray]:
  """``states(labels, example_ids, step)`` for the trainer (and its benchmark): LMT states by
  ``config.lmt`` when ``config.model.use_lmt``, else every label unknown. Checks
  ``config.lmt`` now, before anything runs."""
  lmt = config.lmt
  check_range("lmt.max_known_fraction", lmt.max_known_fraction, 0.0, 1.0)
  check_range("lmt.all_unknown_fraction", lmt.all_unknown_fraction, 0.0, 1.0)
  if not isinstance(lmt.num_maskable, int) or lmt.num_maskable < 0:
    raise ValueError(f"config.lmt.num_maskable={lmt.num_maskable!r}; expected an integer "
                     ">= 0 (0: every label may be known)")
  if not config.model.use_lmt:
    return lambda labels, example_ids, step: np.full(np.shape(labels), UNKNOWN, np.int32)

  def states(labels, example_ids, step):
    return train_states(labels, example_ids, step=step, seed=config.seed,
                        max_known_fraction=lmt.max_known_fraction,
                        num_maskable=lmt.num_maskable,
                        all_unknown_fraction=lmt.all_unknown_fraction)

  return states


def eval_states(labels, example_ids, *, known_fraction: float, seed: int = 0) -> np.ndarray:
  """States for partial-label evaluation: ``int(fraction * L)`` known labels per example.

  The known set depends only on (seed, example id); the sets are nested across fractions
  (every label known at 25 % is also known at 50 %), so fractions are comparable.
  """
  if not 0.0 <= known_fraction <= 1.0:
    raise ValueError(f"known_fraction must be in [0, 1], got {known_fraction}")
  labels = np.asarray(labels)
  ids = np.asarray(example_ids).astype(np.uint64)[:, None]
  num_labels = labels.shape[-1]
  num_known = np.full(labels.shape[0], int(known_fraction * num_labels))
  scores = _uniform(_EVAL, seed, ids, np.arange(num_labels, dtype=np.uint64))
  return states_from_known(labels, _known_subset(scores, num_known))


_GROUPS = 3  # stream tag of the extra-label group order


def group_order(num_groups: int, seed: int = 0) -> np.ndarray:
  """A seeded permutation of the concept groups: the first n are known with n groups given.

  One order per seed for the whole dataset (as the reference draws its groups once per
  dataset object), so 10 known groups are a subset of 15, and 15 of 20.
  """
  scores = _uniform(_GROUPS, seed, np.arange(num_groups, dtype=np.uint64))
  return np.argsort(scores, kind="stable")


def extra_label_states(labels, visible, *, concept_groups, num_known_groups: int,
                       num_groups: int | None = None, seed: int = 0) -> np.ndarray:
  """States for extra-label evaluation (CUB): whole concept groups given as known.

  Every concept whose group is among the first ``num_known_groups`` of `group_order` is
  known with its true state, except where ``visible`` is False for that image (the
  annotator marked the attribute "not visible"). Labels after the concepts (the classes)
  stay unknown.
  """
  labels = np.asarray(labels)
  groups = np.asarray(concept_groups, np.int64)
  num_groups = int(num_groups if num_groups is not None else groups.max() + 1)
  if not 0 <= num_known_groups <= num_groups:
    raise ValueError(f"num_known_groups must be in [0, {num_groups}], got {num_known_groups}")
  chosen = group_order(num_groups, seed)[:num_known_groups]
  known = np.zeros(labels.shape, bool)
  k = len(groups)
  known[:, :k] = np.isin(groups, chosen)[None] & np.asarray(visible, bool)[:, :k]
  return states_from_known(labels, known)
