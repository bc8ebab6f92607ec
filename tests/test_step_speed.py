"""The train step's speed and memory changes (issue 13) keep its results: the residual
stream's fusion barrier, the non-finite guard as a conditional, and releasing host memory
after set-up. (Their speed is measured in benchmarks/, never asserted here.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_ctran

from ctran_jax import host_memory, losses, model_store, resilience, train
from ctran_jax.models import resnet


def test_materialize_is_the_identity_and_a_nan_reaches_everything():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 4)), jnp.float32)
  np.testing.assert_array_equal(jax.jit(resnet.materialize)(x), x)
  # Its gradient is the identity too.
  w = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
  grad = jax.grad(lambda v: jnp.sum(resnet.materialize(v) * w))(x)
  np.testing.assert_array_equal(grad, w)
  # A NaN in the first entry (the predicate it reads) makes every entry NaN: in training a
  # NaN anywhere already makes the summed loss non-finite, and the step is skipped.
  poisoned = jax.jit(resnet.materialize)(x.at[0, 0, 0, 0].set(jnp.nan))
  assert bool(jnp.all(jnp.isnan(poisoned)))
  # A NaN elsewhere stays where it is (the barrier adds none).
  elsewhere = jax.jit(resnet.materialize)(x.at[1, 2, 2, 3].set(jnp.nan))
  assert int(jnp.sum(jnp.isnan(elsewhere))) == 1


def test_the_barrier_is_only_in_training_on_cpu():
  """Training on XLA:CPU gets one conditional per residual block; evaluation none."""
  model = tiny_ctran(num_labels=3)
  images = jnp.zeros((2, 32, 32, 3))
  states = -jnp.ones((2, 3), jnp.int32)

  def conditionals(train_mode: bool) -> int:
    model.train() if train_mode else model.eval()
    graph, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graph, s)(images, states))(state)
    return str(jaxpr).count("cond[")

  blocks = sum(len(getattr(model.backbone, f"layer{i}")) for i in (1, 2, 3, 4))
  assert conditionals(train_mode=True) == blocks
  assert conditionals(train_mode=False) == 0


def one_step(monkeypatch, *, barrier: bool, images):
  """One train step of a tiny C-Tran from fixed weights; `barrier` False replaces the
  fusion barrier with the identity."""
  if not barrier:
    monkeypatch.setattr(resnet, "materialize", lambda x: x)
  model = tiny_ctran(num_labels=5, dropout=0.0)
  model_def = model_store.ModelDef.build(model_store.model_config(model))
  params, batch_stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  rng = np.random.default_rng(0)
  labels = (rng.random((4, 5)) < 0.4).astype(np.int32)
  batch = {"image": images, "labels": jnp.asarray(labels),
           "states": jnp.asarray(np.where(rng.random((4, 5)) < 0.5, labels, -1), jnp.int32)}
  tx = optax.adam(1e-3)
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32), "health": resilience.initial_health()}
  step = jax.jit(train.make_train_step(model_def, losses.MaskedBCE("sum"), tx,
                                       optax.constant_schedule(1e-3), seed=0, accum_steps=1))
  return step(state, batch, jnp.float32(1.0))


def test_the_barrier_does_not_change_the_step(monkeypatch):
  images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  with_barrier, metrics = one_step(monkeypatch, barrier=True, images=images)
  without, metrics_without = one_step(monkeypatch, barrier=False, images=images)
  assert float(metrics["finite"]) == 1.0
  assert float(metrics["loss"]) == pytest.approx(float(metrics_without["loss"]), rel=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(with_barrier["params"]),
      jax.tree.leaves(nnx.state(tiny_ctran(num_labels=5, dropout=0.0), nnx.Param)),
      strict=True))
  assert moved > 1e-4  # the step did something
  for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(without), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_keeps_every_value_and_counts(monkeypatch):
  """The guard is a conditional now: the skipped branch returns the incoming state."""
  images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  good, _ = one_step(monkeypatch, barrier=True, images=images)
  bad, metrics = one_step(monkeypatch, barrier=True, images=images.at[2, 5, 5, 1].set(jnp.inf))
  assert float(metrics["finite"]) == 0.0
  fresh = tiny_ctran(num_labels=5, dropout=0.0)
  for new, old in ((bad["params"], nnx.state(fresh, nnx.Param)),
                   (bad["batch_stats"], nnx.state(fresh, nnx.BatchStat))):
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(float(jnp.max(jnp.abs(m))) == 0.0
             for m in jax.tree.leaves(bad["opt_state"]) if m.dtype == jnp.float32)
  assert int(bad["health"]["nonfinite_steps"]) == 1 and int(bad["step"]) == 1
  assert int(good["health"]["nonfinite_steps"]) == 0


def test_release_trims_the_heap_and_can_drop_compiled_functions():
  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return x + 1

  f(jnp.ones(3))
  f(jnp.ones(3))
  assert len(traces) == 1
  trimmed = host_memory.release()
  assert trimmed in (True, False)  # False only where there is no glibc malloc_trim
  f(jnp.ones(3))
  assert len(traces) == 1  # kept: nothing dropped without drop_compiled
  host_memory.release(drop_compiled=True)
  f(jnp.ones(3))
  assert len(traces) == 2  # traced (and compiled) again
