"""Label-mask training loss: BCE with logits on the labels whose state is unknown.

`from_config(config.loss)` is the trainer's loss; `masked_bce` the same as a function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ctran_jax.config_util import check_choice
from ctran_jax.numerics import at_least_float32

REDUCTIONS = ("sum", "mean")
LOSS_LABELS = ("unknown", "all")


@dataclasses.dataclass(frozen=True)
class MaskedBCE:
  """BCE-with-logits over the entries in the loss: unknown ones (state -1, the reference's
  LMT loss) or, with ``labels="all"``, every entry (the reference's ``--loss_labels all``:
  the logits of known labels then learn to agree with the state they were given).

  ``reduction="sum"`` is the reference's plain sum over batch and labels (its scale grows
  with the batch); ``"mean"`` divides by the number of entries in the loss (the
  reference's CUB loss, and batch-size independent).
  """
  reduction: str = "sum"
  labels: str = "unknown"

  def __post_init__(self):
    check_choice("loss.reduction", self.reduction, REDUCTIONS)
    check_choice("loss.labels", self.labels, LOSS_LABELS)

  def weights(self, label_states: jax.Array) -> jax.Array:
    """1.0 where an entry counts in the loss, else 0.0 (float32, shape of the states)."""
    states = jnp.asarray(label_states)
    if self.labels == "all":
      return jnp.ones(states.shape, jnp.float32)
    return (states == -1).astype(jnp.float32)

  def total(self, logits: jax.Array, labels: jax.Array,
            label_states: jax.Array | None = None) -> jax.Array:
    """The summed loss over the entries in the loss (all entries when no states)."""
    logits = at_least_float32(logits)
    per_entry = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    if label_states is None:
      return jnp.sum(per_entry)
    return jnp.sum(per_entry * self.weights(label_states).astype(logits.dtype))

  def __call__(self, logits, labels, label_states=None) -> jax.Array:
    total = self.total(logits, labels, label_states)
    if self.reduction == "sum":
      return total
    count = (jnp.float32(jnp.size(labels)) if label_states is None
             else jnp.sum(self.weights(label_states)))
    return total / jnp.maximum(count, 1.0)


def from_config(loss_config) -> MaskedBCE:
  """The loss ``config.loss`` describes (its values checked here)."""
  return MaskedBCE(reduction=loss_config.reduction, labels=loss_config.labels)


def masked_bce(logits: jax.Array, labels: jax.Array, label_states: jax.Array | None = None,
               *, reduction: str = "sum", labels_in_loss: str = "unknown") -> jax.Array:
  """`MaskedBCE` as a function: the loss of `logits` against `labels` under `label_states`."""
  return MaskedBCE(reduction, labels_in_loss)(logits, labels, label_states)
