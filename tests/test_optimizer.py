"""Optimizer recipe switches: which parameters weight decay reaches (``optimizer.decay_mask``)
and the one-cycle learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import demo_config, tiny_ctran

from ctran_jax import sharding, train

# The leaves of `tiny_ctran()` (bottleneck ResNet, 1 block per stage, 2 encoder layers) that
# weight decay reaches under decay_mask="kernels": every Conv / Linear kernel, and the
# label-wise head's; no bias, BatchNorm/LayerNorm scale or embedding table.
DECAYED = sorted(
    ["backbone/conv1/kernel"]
    + [f"backbone/layer{s}/0/{conv}/kernel" for s in (1, 2, 3, 4)
       for conv in ("conv1", "conv2", "conv3", "downsample/0")]
    + [f"encoder/{i}/{linear}/kernel" for i in (0, 1)
       for linear in ("in_proj", "out_proj", "linear1", "linear2")]
    + ["projection/kernel", "head/kernel"])


def leaf_paths(tree) -> dict[str, jax.Array]:
  """{"a/b/kernel": leaf} (the trailing "/value" of an nnx.Variable dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name.removesuffix("/value")] = leaf
  return out


@pytest.fixture(scope="module")
def params():
  return nnx.state(tiny_ctran(), nnx.Param)


def test_decay_mask_is_exactly_the_conv_and_linear_kernels(params):
  mask = leaf_paths(train.kernel_mask(params))
  assert sorted(k for k, decays in mask.items() if decays) == DECAYED
  kept = sorted(k for k, decays in mask.items() if not decays)
  assert all(k.endswith(("/bias", "/scale", "/embedding")) for k in kept), kept
  assert {"label_embedding/embedding", "state_embedding/embedding", "head/bias",
          "input_norm/scale", "backbone/bn1/scale"} <= set(kept)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("decay_mask", ["kernels", "all"])
def test_weight_decay_reaches_only_the_masked_leaves(params, name, decay_mask):
  """With zero gradients, an update moves exactly the leaves that decay."""
  config = demo_config(**{"optimizer.name": name, "optimizer.weight_decay": 0.1,
                          "optimizer.decay_mask": decay_mask, "schedule.name": "constant",
                          "schedule.warmup_steps": 0})
  tx, _ = train.make_optimizer(config, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  moved = sorted(k for k, u in leaf_paths(updates).items() if np.any(np.asarray(u) != 0))
  every_nonzero = sorted(k for k, p in leaf_paths(params).items() if np.any(np.asarray(p)))
  assert moved == (DECAYED if decay_mask == "kernels" else every_nonzero)


def test_masked_optimizer_state_initialises_sharded():
  """The masked state (optax MaskedNode leaves) goes through the FSDP sharding rule."""
  config = demo_config(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.05,
                          "model.backbone_width": 8, "model.hidden": 32, "model.layers": 1,
                          "mesh.fsdp": 2, "mesh.fsdp_min_size": 64})
  tx, _ = train.make_optimizer(config, 10)
  model_def = train.model_from_config(config, 6)
  abstract, initialise = train.train_state(config, sharding.make_mesh(-1, fsdp=2), model_def,
                                           tx)
  state = initialise()
  assert jax.tree.structure(state) == jax.tree.structure(abstract)


def test_onecycle_schedule():
  config = demo_config(**{"schedule.name": "onecycle", "optimizer.learning_rate": 1e-3,
                          "schedule.pct_start": 0.25, "schedule.div_factor": 20.0,
                          "schedule.final_div_factor": 100.0})
  _, schedule = train.make_optimizer(config, 400)
  lr = np.array([float(schedule(s)) for s in range(401)])
  assert lr[0] == pytest.approx(1e-3 / 20)
  assert lr.max() == pytest.approx(1e-3) and int(np.argmax(lr)) == 100
  assert lr[400] == pytest.approx(1e-3 / 20 / 100)
  assert np.all(np.diff(lr[:101]) > 0) and np.all(np.diff(lr[100:]) < 0)


@pytest.mark.parametrize("overrides,match", [
    ({"optimizer.decay_mask": "biases"},
     "config.optimizer.decay_mask='biases'; expected one of kernels, all"),
    ({"schedule.name": "onecycle", "schedule.pct_start": 1.0}, "onecycle needs 0 < pct_start"),
    ({"schedule.name": "onecycle", "schedule.div_factor": 0.5}, "div_factor >= 1"),
    ({"schedule.name": "linear"}, "config.schedule.name='linear'; expected one of .*onecycle"),
])
def test_bad_optimizer_values_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(demo_config(**overrides), 10)
