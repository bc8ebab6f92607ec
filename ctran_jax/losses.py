"""Label-mask training loss: BCE with logits on the labels whose state is unknown."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ctran_jax.numerics import at_least_float32

REDUCTIONS = ("sum", "mean")


def masked_bce(logits: jax.Array, labels: jax.Array, label_states: jax.Array | None = None,
               *, reduction: str = "sum") -> jax.Array:
  """BCE-with-logits over the entries whose state is unknown (-1); all entries if no states.

  ``sum`` is the reference's LMT loss (a plain sum over batch and labels; its scale grows
  with batch size); ``mean`` divides by the number of unknown entries (the reference's CUB
  loss, and a batch-size independent choice).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
  logits = at_least_float32(logits)
  per_entry = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  weight = (jnp.ones_like(per_entry) if label_states is None
            else (jnp.asarray(label_states) == -1).astype(logits.dtype))
  total = jnp.sum(per_entry * weight)
  return total if reduction == "sum" else total / jnp.maximum(jnp.sum(weight), 1.0)
