"""An exponential moving average (EMA) of the weights, kept in the train state.

Query2Label, ASL and ML-Decoder evaluate an EMA of the weights (decay 0.9997): it smooths
the last steps' noise and is usually a few tenths of mAP better than the raw weights.
With ``config.ema.decay`` > 0 the train state holds ``"ema": {"params", "batch_stats"}``
(float32, sharded like the weights, checkpointed and resumed with them) updated after
every applied step:

    ema <- d * ema + (1 - d) * weights,   d = min(decay, (1 + t) / (10 + t)) with warm-up

(the warm-up, TensorFlow's ``num_updates`` rule, lets the average follow the fast early
changes instead of remembering the random initialisation for thousands of steps).
Evaluation, model selection and export then use the EMA weights (`weights_of`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_config(ema_config) -> None:
  decay = ema_config.decay
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.ema.decay={decay!r}; expected 0 (off) or a value in (0, 1), "
                     "e.g. 0.9997")


def enabled(config) -> bool:
  return config.ema.decay > 0


def initial(params, batch_stats) -> dict:
  """The average starts at the initial weights (a copy: the state donates its buffers)."""
  return {"params": jax.tree.map(jnp.copy, params),
          "batch_stats": jax.tree.map(jnp.copy, batch_stats)}


def decay_at(step, decay: float, warmup: bool) -> jax.Array:
  """The decay used after step `step` (0-based count of applied steps)."""
  d = jnp.float32(decay)
  if warmup:
    t = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  return d


def update(ema: dict, params, batch_stats, step, *, decay: float, warmup: bool) -> dict:
  d = decay_at(step, decay, warmup)
  mix = lambda a, w: d * a + (1.0 - d) * w  # noqa: E731
  return {"params": jax.tree.map(mix, ema["params"], params),
          "batch_stats": jax.tree.map(mix, ema["batch_stats"], batch_stats)}


def weights_of(state: dict, *, raw: bool = False) -> dict:
  """``{"params", "batch_stats"}`` to evaluate or export: the EMA ones when the state has
  them (unless `raw`), else the trained ones."""
  if "ema" in state and not raw:
    return state["ema"]
  return {"params": state["params"], "batch_stats": state["batch_stats"]}
