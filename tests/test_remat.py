"""Rematerialisation changes the compiled program, never the numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctran_jax.models.ctran import CTran
from ctran_jax.models.remat import set_remat


@functools.cache
def _train_step_outputs(which):
  model = CTran(5, backbone_depth=0, backbone_width=8, backbone_stage_sizes=(1, 1, 1, 1),
                backbone_block="basic", hidden=32, layers=2, heads=4, dropout=0.3,
                rngs=nnx.Rngs(0))
  set_remat(model, which)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  states = jnp.array([[-1, 0, 1, -1, -1]] * 4)

  @jax.jit
  def step(params, rest):
    merged = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(images, states) ** 2))(merged)
    return loss, nnx.state(grads, nnx.Param), nnx.state(merged, nnx.BatchStat)

  return step(params, rest), step.lower(params, rest).as_text()


@pytest.mark.parametrize("which", ["backbone", "encoder", "all"])
def test_remat_gives_identical_loss_gradients_and_batch_stats(which):
  (loss, grads, stats), _ = _train_step_outputs("none")
  (loss_r, grads_r, stats_r), text = _train_step_outputs(which)
  assert "optimization_barrier" in text               # the program really recomputes
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)  # dropout masks included
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats_r), jax.tree.leaves(stats), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads_r))


def test_unknown_remat_choice_is_an_error():
  model = nnx.eval_shape(lambda: CTran(3, backbone_depth=0, backbone_width=8,
                                       backbone_stage_sizes=(1, 1, 1, 1),
                                       backbone_block="basic", hidden=16, layers=1,
                                       rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="remat must be one of"):
    set_remat(model, "everything")
