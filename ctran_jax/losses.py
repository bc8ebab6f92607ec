"""Label-mask training losses: a per-entry loss summed over the labels whose state is unknown.

`from_config(config.loss)` is the trainer's loss; `masked_bce` the BCE as a function.
``config.loss.name`` picks the per-entry loss:

* ``"bce"`` (reference): binary cross-entropy with logits.
* ``"asl"``: the asymmetric loss of Ridnik et al., "Asymmetric Loss For Multi-Label
  Classification" (ICCV 2021). With p = sigmoid(logit) and the shifted probability
  p_m = max(p - clip, 0) of negatives,
      positive (label 1): -(1 - p)^gamma_pos * log(p)
      negative (label 0): -p_m^gamma_neg * log(1 - p_m)
  gamma_neg > gamma_pos down-weights the many easy negatives of multi-label data, and the
  margin ``clip`` drops negatives with p <= clip altogether. The paper's choice is
  gamma_neg=4, gamma_pos=0, clip=0.05. gamma_neg = gamma_pos = clip = 0 is the BCE.
* ``"focal"``: the focal loss of Lin et al. (2017) without its alpha weight, which is ASL
  with gamma_neg = gamma_pos = gamma and clip = 0; it is built as such and so needs
  ``loss.gamma_neg == loss.gamma_pos`` (the gamma) and ``loss.clip == 0``.

Every loss is computed in float32 (or wider) from log-sigmoids, so no logit gives log(0)
or a non-finite gradient: log(p) = log_sigmoid(x), log(1 - p) = log_sigmoid(-x),
(1 - p)^g = exp(g * log_sigmoid(-x)), and with a margin 1 - p_m = min(sigmoid(-x) + clip, 1)
is at least clip > 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ctran_jax.config_util import check_choice
from ctran_jax.numerics import at_least_float32

REDUCTIONS = ("sum", "mean")
LOSS_LABELS = ("unknown", "all")
LOSS_NAMES = ("bce", "asl", "focal")


@dataclasses.dataclass(frozen=True)
class MaskedBCE:
  """BCE-with-logits over the entries in the loss: unknown ones (state -1, the reference's
  LMT loss) or, with ``labels="all"``, every entry (the reference's ``--loss_labels all``:
  the logits of known labels then learn to agree with the state they were given).

  ``reduction="sum"`` is the reference's plain sum over batch and labels (its scale grows
  with the batch); ``"mean"`` divides by the number of entries in the loss (the
  reference's CUB loss, and batch-size independent).

  Subclasses change only `per_entry`; the entries in the loss and the reduction are the
  same for every loss.
  """
  reduction: str = "sum"
  labels: str = "unknown"

  def __post_init__(self):
    check_choice("loss.reduction", self.reduction, REDUCTIONS)
    check_choice("loss.labels", self.labels, LOSS_LABELS)

  def per_entry(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss of every entry (float32 or wider, the shape of the logits)."""
    logits = at_least_float32(logits)
    labels = labels.astype(logits.dtype)
    # = optax.sigmoid_binary_cross_entropy, written out as `MaskedASL.per_entry` is.
    return -labels * jax.nn.log_sigmoid(logits) - (1.0 - labels) * jax.nn.log_sigmoid(-logits)

  def weights(self, label_states: jax.Array) -> jax.Array:
    """1.0 where an entry counts in the loss, else 0.0 (float32, shape of the states)."""
    states = jnp.asarray(label_states)
    if self.labels == "all":
      return jnp.ones(states.shape, jnp.float32)
    return (states == -1).astype(jnp.float32)

  def total(self, logits: jax.Array, labels: jax.Array,
            label_states: jax.Array | None = None) -> jax.Array:
    """The summed loss over the entries in the loss (all entries when no states)."""
    per_entry = self.per_entry(logits, labels)
    if label_states is None:
      return jnp.sum(per_entry)
    return jnp.sum(per_entry * self.weights(label_states).astype(per_entry.dtype))

  def __call__(self, logits, labels, label_states=None) -> jax.Array:
    total = self.total(logits, labels, label_states)
    if self.reduction == "sum":
      return total
    count = (jnp.float32(jnp.size(labels)) if label_states is None
             else jnp.sum(self.weights(label_states)))
    return total / jnp.maximum(count, 1.0)


@dataclasses.dataclass(frozen=True)
class MaskedASL(MaskedBCE):
  """The asymmetric loss (module docstring) over the entries in the loss, reduced as
  `MaskedBCE`. Focal loss: ``gamma_neg == gamma_pos``, ``clip=0``."""
  gamma_neg: float = 4.0
  gamma_pos: float = 0.0
  clip: float = 0.05

  def __post_init__(self):
    super().__post_init__()
    for key in ("gamma_neg", "gamma_pos"):
      value = getattr(self, key)
      if not value >= 0:
        raise ValueError(f"config.loss.{key}={value!r}; expected a value >= 0")
    if not 0 <= self.clip < 1:
      raise ValueError(f"config.loss.clip={self.clip!r}; expected a value in [0, 1)")

  def per_entry(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = at_least_float32(logits)
    labels = labels.astype(logits.dtype)
    log_p = jax.nn.log_sigmoid(logits)           # log p
    log_not_p = jax.nn.log_sigmoid(-logits)      # log (1 - p)
    # Positives: (1 - p)^gamma_pos * log p.
    positive = log_p if not self.gamma_pos else jnp.exp(self.gamma_pos * log_not_p) * log_p
    # Negatives: p_m^gamma_neg * log(1 - p_m), p_m = max(p - clip, 0).
    focus = None                                 # p_m^gamma_neg; None: 1
    if self.clip:
      # 1 - p_m = min(1 - p + clip, 1) >= clip: the log is finite.
      log_not_pm = jnp.log(jnp.minimum(jax.nn.sigmoid(-logits) + self.clip, 1.0))
      if self.gamma_neg:
        # exp(gamma log p_m), the log taken only where p_m > 0 (finite gradients).
        p_m = jnp.maximum(jax.nn.sigmoid(logits) - self.clip, 0.0)
        shifted = p_m > 0
        safe_p_m = jnp.where(shifted, p_m, 1.0)
        focus = jnp.where(shifted, jnp.exp(self.gamma_neg * jnp.log(safe_p_m)), 0.0)
    else:
      log_not_pm = log_not_p
      if self.gamma_neg:
        focus = jnp.exp(self.gamma_neg * log_p)
    negative = log_not_pm if focus is None else focus * log_not_pm
    return -labels * positive - (1.0 - labels) * negative


def from_config(loss_config) -> MaskedBCE:
  """The loss ``config.loss`` describes (its values checked here).

  ``loss.name`` "bce" refuses non-zero gamma_neg/gamma_pos/clip (they would do nothing);
  "focal" needs gamma_neg == gamma_pos and clip == 0.
  """
  name = loss_config.get("name", "bce")
  check_choice("loss.name", name, LOSS_NAMES)
  common = dict(reduction=loss_config.reduction, labels=loss_config.labels)
  shape = {k: loss_config.get(k, 0.0) for k in ("gamma_neg", "gamma_pos", "clip")}
  if name == "bce":
    for key, value in shape.items():
      if value:
        raise ValueError(f"config.loss.{key}={value!r} has no effect with "
                         "config.loss.name='bce'; set config.loss.name='asl' (or 'focal')")
    return MaskedBCE(**common)
  if name == "focal" and (shape["gamma_neg"] != shape["gamma_pos"] or shape["clip"]):
    raise ValueError(
        f"config.loss.name='focal' is ASL with gamma_neg == gamma_pos and clip == 0; got "
        f"config.loss.gamma_neg={shape['gamma_neg']!r}, config.loss.gamma_pos="
        f"{shape['gamma_pos']!r}, config.loss.clip={shape['clip']!r} (use 'asl' for those)")
  return MaskedASL(**common, **{k: float(v) for k, v in shape.items()})


def masked_bce(logits: jax.Array, labels: jax.Array, label_states: jax.Array | None = None,
               *, reduction: str = "sum", labels_in_loss: str = "unknown") -> jax.Array:
  """`MaskedBCE` as a function: the loss of `logits` against `labels` under `label_states`."""
  return MaskedBCE(reduction, labels_in_loss)(logits, labels, label_states)
