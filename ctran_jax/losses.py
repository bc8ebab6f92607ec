"""Label-mask training loss: BCE with logits on the labels whose state is unknown."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ctran_jax.numerics import at_least_float32

REDUCTIONS = ("sum", "mean")
LOSS_LABELS = ("unknown", "all")


def loss_weights(label_states: jax.Array, labels_in_loss: str = "unknown") -> jax.Array:
  """1.0 where an entry counts in the loss: unknown entries (reference), or every entry."""
  if labels_in_loss not in LOSS_LABELS:
    raise ValueError(f"loss labels must be one of {LOSS_LABELS}, got {labels_in_loss!r}")
  states = jnp.asarray(label_states)
  if labels_in_loss == "all":
    return jnp.ones(states.shape, jnp.float32)
  return (states == -1).astype(jnp.float32)


def masked_bce(logits: jax.Array, labels: jax.Array, label_states: jax.Array | None = None,
               *, reduction: str = "sum", labels_in_loss: str = "unknown") -> jax.Array:
  """BCE-with-logits over the entries whose state is unknown (-1); all entries if no states.

  ``sum`` is the reference's LMT loss (a plain sum over batch and labels; its scale grows
  with batch size); ``mean`` divides by the number of entries in the loss (the reference's
  CUB loss, and a batch-size independent choice). ``labels_in_loss="all"`` also counts the
  known entries (the reference's ``--loss_labels all``): their logits then learn to agree
  with the state they were given.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
  logits = at_least_float32(logits)
  per_entry = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  weight = (jnp.ones_like(per_entry) if label_states is None
            else loss_weights(label_states, labels_in_loss).astype(logits.dtype))
  total = jnp.sum(per_entry * weight)
  return total if reduction == "sum" else total / jnp.maximum(jnp.sum(weight), 1.0)
