"""Unit tests of the ResNet backbone and the C-Tran module on small configurations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_inputs, tiny_ctran
from synthetic_weights import PARITY_DIR

from ctran_jax import convert
from ctran_jax.models import CTran, ResNet, sincos_position_embedding_2d


def num_params(model):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


# torchvision's parameter counts minus the 1000-way fc layer (facts from torchvision).
@pytest.mark.parametrize("depth,with_fc,fc_in,channels", [
    (18, 11_689_512, 512, 512), (50, 25_557_032, 2048, 2048), (101, 44_549_160, 2048, 2048)])
def test_resnet_presets_match_torchvision_sizes_and_shapes(depth, with_fc, fc_in, channels):
  model = nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0)))
  assert num_params(model) == with_fc - (fc_in * 1000 + 1000)
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 224, 160, 3),
                                                                      jnp.float32))
  assert out.shape == (2, 7, 5, channels)


def test_resnet101_layout_names_are_torchvision_names():
  model = nnx.eval_shape(lambda: ResNet(101, rngs=nnx.Rngs(0)))
  with open(PARITY_DIR / "spec_resnet101.json") as f:
    spec = {e["name"]: tuple(e["shape"]) for e in json.load(f)["entries"]}
  expected = {k: v for k, v in spec.items()
              if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
  layout = convert.torch_layout(model)
  assert {k: v[1] for k, v in layout.items()} == expected


@pytest.mark.parametrize("block,size,expected_hw", [("basic", 64, (2, 2)),
                                                   ("bottleneck", 70, (3, 3))])
def test_tiny_resnet_forward(block, size, expected_hw):
  model = ResNet(0, width=8, stage_sizes=(1, 1, 1, 1), block=block, rngs=nnx.Rngs(0))
  model.eval()
  out = nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, size, size, 3)))
  channels = 64 if block == "basic" else 256
  assert out.shape == (1, *expected_hw, channels)
  assert bool(jnp.all(out >= 0))  # the last op is a ReLU


def test_resnet_rejects_unknown_depth():
  with pytest.raises(ValueError, match="depth must be one of"):
    ResNet(42, rngs=nnx.Rngs(0))


def test_logits_and_attention_shapes(tiny_model):
  images, states = random_inputs()
  logits, attention = tiny_model(images, states, return_attention=True)
  s = 2 * 2 + 6  # 64px -> 2x2 image tokens, plus 6 label tokens
  assert logits.shape == (2, 6) and logits.dtype == jnp.float32
  assert attention.shape == (2, 2, s, s)  # (layers, B, S, S)
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)


def test_label_states_change_logits_only_with_lmt(tiny_model):
  images, _ = random_inputs()
  unknown = -jnp.ones((2, 6), jnp.int32)
  positive = jnp.ones((2, 6), jnp.int32)
  a, b = tiny_model(images, unknown), tiny_model(images, positive)
  assert np.abs(a - b).max() > 1e-3
  no_lmt = nnx.view(tiny_model, use_lmt=False)
  np.testing.assert_array_equal(no_lmt(images, unknown), no_lmt(images, positive))
  assert tiny_model.use_lmt  # a view leaves the model itself alone


def test_label_states_shape_is_checked(tiny_model):
  images, _ = random_inputs()
  with pytest.raises(ValueError, match=r"label_states must have shape \(2, 6\)"):
    tiny_model(images, -jnp.ones((2, 5), jnp.int32))


def test_label_only_ablation_drops_image_tokens(tiny_model):
  images, states = random_inputs()
  label_only = nnx.view(tiny_model, image_tokens=False)
  _, attention = label_only(images, states, return_attention=True)
  assert attention.shape == (2, 2, 6, 6)
  other_images, _ = random_inputs(seed=1)
  np.testing.assert_allclose(label_only(images, states), label_only(other_images, states),
                             atol=1e-6)


def test_projection_only_when_channels_differ():
  assert tiny_ctran().projection is not None  # 256 backbone channels -> hidden 32
  same = tiny_ctran(hidden=256, heads=4)
  assert same.projection is None
  images, states = random_inputs()
  assert same(images, states).shape == (2, 6)


def test_position_embedding_table():
  table = sincos_position_embedding_2d(3, 5, 16)
  assert table.shape == (15, 16)
  grid = table.reshape(3, 5, 16)
  # First half depends on x only, second half on y only.
  np.testing.assert_array_equal(grid[0, :, :8], grid[2, :, :8])
  np.testing.assert_array_equal(grid[:, 0, 8:], grid[:, 4, 8:])
  assert np.abs(grid[0, 0, :8] - grid[0, 1, :8]).max() > 0.1
  np.testing.assert_allclose(grid[0, 0, 0::2], 0.0)  # sin(0)
  np.testing.assert_allclose(grid[0, 0, 1::2], 1.0)  # cos(0)
  with pytest.raises(ValueError, match="hidden % 4"):
    sincos_position_embedding_2d(2, 2, 18)


def test_position_embedding_changes_outputs_on_non_square_maps(tiny_model):
  images, states = random_inputs(size=64, width=128)  # 2 x 4 feature map
  with_pos = nnx.view(tiny_model, pos_emb=True)  # same weights, no new parameters
  plain_logits, attention = tiny_model(images, states, return_attention=True)
  pos_logits, pos_attention = with_pos(images, states, return_attention=True)
  assert attention.shape == pos_attention.shape == (2, 2, 8 + 6, 8 + 6)
  assert np.abs(plain_logits - pos_logits).max() > 1e-4


def test_unknown_state_row_is_not_trained(tiny_model):
  images, _ = random_inputs()
  states = jnp.array([[-1, 0, 1, -1, 0, 1], [1, 1, -1, -1, 0, 0]], jnp.int32)

  def loss(model):
    return jnp.sum(model(images, states) ** 2)

  grads = nnx.jit(nnx.grad(loss))(tiny_model)
  table_grad = grads["state_embedding"]["embedding"][...]
  assert np.all(table_grad[0] == 0.0)
  assert np.abs(table_grad[1:]).min(axis=1).max() > 0

  learnt = tiny_ctran(train_unknown_state=True)
  nnx.update(learnt, nnx.state(tiny_model))
  np.testing.assert_array_equal(learnt(images, states), tiny_model(images, states))
  table_grad = nnx.jit(nnx.grad(loss))(learnt)["state_embedding"]["embedding"][...]
  assert np.abs(table_grad[0]).max() > 0


def test_bfloat16_runs_and_tracks_float32(tiny_model):
  images, states = random_inputs()
  bf16 = tiny_ctran(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(tiny_model))
  assert bf16.backbone(images).dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  ref, low = tiny_model(images, states), bf16(images, states)
  assert low.dtype == jnp.float32
  err = np.abs(np.asarray(low) - np.asarray(ref)).max()
  assert 0 < err < 0.05 * max(1.0, np.abs(ref).max())


def test_dropout_only_in_train_mode():
  model = tiny_ctran(dropout=0.5)
  images, states = random_inputs()
  np.testing.assert_array_equal(model(images, states), model(images, states))
  model.train()
  assert np.abs(model(images, states) - model(images, states)).max() > 0


def test_batchnorm_train_mode_updates_statistics_and_frozen_mode_does_not():
  images, states = random_inputs()
  trained = tiny_ctran(dropout=0.0)
  before = np.asarray(trained.backbone.bn1.var[...])
  trained.train()
  trained(images, states)
  assert np.abs(np.asarray(trained.backbone.bn1.var[...]) - before).max() > 1e-4

  frozen = tiny_ctran(dropout=0.0, bn_mode="frozen")
  reference = frozen(images, states)  # eval mode
  frozen.train()
  np.testing.assert_allclose(frozen(images, states), reference, atol=1e-6)
  np.testing.assert_array_equal(frozen.backbone.bn1.var[...], before)


def test_bad_options_are_reported():
  with pytest.raises(ValueError, match="BatchNorm mode"):
    tiny_ctran(bn_mode="sync")
  with pytest.raises(ValueError, match="not divisible by 5 heads"):
    tiny_ctran(heads=5)
  with pytest.raises(ValueError, match="num_labels"):
    CTran(0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("config_name,variant", [("default", None), ("coco", "full"),
                                                 ("cub", None), ("folder", None)])
def test_the_config_description_is_the_built_models_description(config_name, variant):
  """One description of a model: what configs describe is what the built model reports."""
  import importlib

  from ctran_jax import model_store, train

  module = importlib.import_module(f"configs.{config_name}")
  config = module.get_config(variant) if variant else module.get_config()
  model_def = train.model_from_config(config, 17)
  built = nnx.eval_shape(model_def.make)
  assert model_store.model_config(built) == model_def.description
  assert model_def.description["backbone"] == config.model.backbone
