"""Inception-v3 backbone: torchvision layout, shapes, golden torchvision outputs, conversion.

Golden values come from torchvision 0.28.0 (torch 2.13.0+cpu, CPU, float32):
``inception_v3(weights=None, aux_logits=..., init_weights=False)`` holding the synthetic
weights ``synthetic_state_dict(spec_inception_v3.json, seed=0)`` (fingerprinted below),
run on ``default_rng(1).standard_normal((2, 3, 75, 75))`` (NCHW). Our model is built and
loaded through ``ctran_jax.convert``, so these tests check the converter as well.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY
from synthetic_weights import PARITY_DIR, read_spec, sha256_fingerprint, synthetic_state_dict

from ctran_jax import convert, model_store
from ctran_jax.models import CTran, InceptionV3, inception

SPEC = str(PARITY_DIR / "spec_inception_v3.json")
WEIGHTS_SHA256 = "8e7762195689f797ce260dd3cbae73b5411729b99aeae7ae1da600ebc5b4bd1a"
TORCHVISION_PARAMS = 27_161_264  # inception_v3 with AuxLogits and fc (torchvision's docs)

# torchvision eval-mode Mixed_7c at 75x75 (1x1 map): channels GOLDEN_CHANNELS, and sums.
GOLDEN_CHANNELS = [0, 2, 320, 700, 1000, 2047]
GOLDEN_EVAL = np.array([[0.21091633, 0.56857157, 0.1262034, 0.04555952, 0.16923738, 0.036532328],
                        [0.20661251, 0.55971843, 0.12963688, 0.05308146, 0.16729015, 0.03691097]])
GOLDEN_EVAL_SUM = np.array([172.498901367, 171.125701904])
# Running statistics after one train-mode forward of the same input (first 4 channels).
GOLDEN_RUNNING = {
    "Conv2d_1a_3x3": ([-0.093244545, -0.08850391, -0.01134947, -0.1250973],
                      [1.2650132, 1.1131649, 1.1882786, 1.1132597]),
    "Mixed_5b.branch_pool": ([0.013682167, 0.031256665, -0.13591294, 0.34269002],
                             [1.0129519, 1.0350403, 0.9426566, 0.967524]),
}
# AuxLogits alone (eval) on default_rng(2).standard_normal((2, 768, 17, 17)): classes 0,1,2,999.
GOLDEN_AUX = np.array([[-0.299496, -0.10633325, -0.5312161, 0.30040967],
                       [-0.29272178, -0.27850303, -0.4136943, 0.72047186]])
GOLDEN_AUX_SUM = np.array([-3.249711, 17.466705])

forward = nnx.jit(lambda model, x: model(x))


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def golden_input():
  return jnp.asarray(nhwc(np.random.default_rng(1).standard_normal((2, 3, 75, 75))
                          .astype(np.float32)))


def block_factory(dtype):
  """The BasicConv2d factory the Inception blocks take (as InceptionV3 passes it)."""
  return functools.partial(inception.BasicConv2d, bn_mode="train", dtype=dtype, rngs=nnx.Rngs(0))


def get_module(model, dotted):
  for name in dotted.split("."):
    model = getattr(model, name)
  return model


def weight_arrays(model):
  state = nnx.state(model, model_store.WEIGHTS)
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def torch_weights():
  """The synthetic torchvision state dict (with AuxLogits and fc) the golden run used."""
  return synthetic_state_dict(SPEC, 0)


@pytest.fixture(scope="module")
def backbone(torch_weights):
  """InceptionV3 without heads holding `torch_weights` (eval mode), as C-Tran uses it."""
  return convert.inception_from_torchvision(torch_weights, heads=False)


@pytest.fixture(scope="module")
def features(backbone):
  return forward(backbone, golden_input())


@pytest.fixture(scope="module")
def abstract_with_heads():
  return nnx.eval_shape(lambda: InceptionV3(aux_logits=1000, num_classes=1000,
                                            rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- layout, shapes

def test_layout_is_torchvisions_key_for_key(abstract_with_heads):
  spec = {name: shape for name, shape, _ in read_spec(SPEC)}
  expected = {k: v for k, v in spec.items() if not k.endswith("num_batches_tracked")}
  layout = convert.torch_layout(abstract_with_heads)
  assert {k: v[1] for k, v in layout.items()} == expected
  assert "Mixed_6e.branch7x7dbl_5.conv.weight" in layout and "AuxLogits.fc.weight" in layout
  params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(
      nnx.state(abstract_with_heads, nnx.Param)))
  assert params == TORCHVISION_PARAMS


def test_feature_map_is_8x8x2048_at_299(abstract_with_heads):
  image = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  feats, aux = nnx.eval_shape(lambda m, x: m(x, return_aux=True), abstract_with_heads, image)
  assert (feats.shape, feats.dtype) == ((2, 8, 8, 2048), jnp.float32)
  assert (aux.shape, aux.dtype) == ((2, 1000), jnp.float32)
  assert abstract_with_heads.num_features == 2048
  logits = nnx.eval_shape(lambda m, f: m.classify(f), abstract_with_heads, feats)
  assert logits.shape == (2, 1000)
  half = nnx.eval_shape(lambda: InceptionV3(aux_logits=7, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  feats, aux = nnx.eval_shape(lambda m, x: m(x, return_aux=True), half, image)
  assert feats.dtype == jnp.bfloat16 and aux.dtype == jnp.float32 and aux.shape == (2, 7)
  assert {v.dtype for v in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype("float32")}


def test_input_size_limits(abstract_with_heads, backbone):
  def run(size, **kwargs):
    image = jax.ShapeDtypeStruct((1, size, size + 10, 3), jnp.float32)
    return nnx.eval_shape(lambda m, x: m(x, **kwargs), abstract_with_heads, image)

  assert run(75).shape == (1, 1, 1, 2048)  # the smallest input: Mixed_7c is 1x1
  assert run(107).shape == (1, 2, 2, 2048)
  with pytest.raises(ValueError, match="at least 75x75, got 74x84"):
    run(74)
  with pytest.raises(ValueError, match=r"AuxLogits needs .* 17x17 .*got 3x3"):
    run(75, return_aux=True)
  with pytest.raises(ValueError, match="aux_logits > 0"):
    nnx.eval_shape(lambda m, x: m(x, return_aux=True), backbone,
                   jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  with pytest.raises(ValueError, match="num_classes > 0"):
    backbone.classify(jnp.zeros((1, 8, 8, 2048)))
  with pytest.raises(ValueError, match="must be >= 0"):
    InceptionV3(aux_logits=-1, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- building blocks

def test_pools_follow_torch():
  x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  avg = inception.avg_pool(x, 3, 1, 1)  # zeros count in the mean (count_include_pad=True)
  assert avg.shape == x.shape
  np.testing.assert_allclose(avg[0, 0, 0, 0], (0 + 1 + 5 + 6) / 9, rtol=1e-6)
  np.testing.assert_allclose(avg[0, 2, 2, 0], 12.0, rtol=1e-6)  # interior: the plain mean
  pooled = inception.max_pool_3x3_s2(x)  # no padding: 5 -> 2
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[12, 14], [22, 24]])


def test_asymmetric_conv_padding_matches_a_direct_convolution():
  conv = inception.BasicConv2d(2, 3, (1, 7), padding=(0, 3), bn_mode="train", dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  conv.eval()
  x = np.random.default_rng(0).standard_normal((1, 4, 9, 2)).astype(np.float32)
  kernel = np.asarray(conv.conv.kernel[...])  # (1, 7, 2, 3) HWIO
  padded = np.pad(x, ((0, 0), (0, 0), (3, 3), (0, 0)))
  direct = np.stack([np.einsum("bhwc,wco->bho", padded[:, :, j:j + 7], kernel[0])
                     for j in range(9)], axis=2)
  bn = conv.bn  # fresh statistics: mean 0, var 1, eps 1e-3
  expected = np.maximum(direct / np.sqrt(1 + 1e-3), 0)
  assert bn.epsilon == 1e-3
  np.testing.assert_allclose(conv(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_eps_and_modes():
  x = np.random.default_rng(0).standard_normal((4, 3, 3, 5)).astype(np.float32) * 0.02
  bn = inception.InceptionBatchNorm(5)
  bn.train()
  y = bn(jnp.asarray(x))
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  # the eps matters at this scale: 1e-3 is torchvision's, ResNet's 1e-5 would differ a lot
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * 36 / 35, rtol=1e-5)
  frozen = inception.InceptionBatchNorm(5, mode="frozen")
  frozen.train()
  np.testing.assert_allclose(frozen(jnp.asarray(x)), x / np.sqrt(1 + 1e-3), rtol=1e-5)
  np.testing.assert_array_equal(frozen.mean[...], np.zeros(5))


# --------------------------------------------------------------------------- torchvision parity

def test_synthetic_weights_are_the_golden_ones(torch_weights):
  assert sha256_fingerprint(torch_weights) == WEIGHTS_SHA256


def test_eval_forward_matches_torchvision(features):
  assert features.shape == (2, 1, 1, 2048) and features.dtype == jnp.float32
  feats = np.asarray(features)[:, 0, 0]
  np.testing.assert_allclose(feats[:, GOLDEN_CHANNELS], GOLDEN_EVAL, atol=1e-5)
  np.testing.assert_allclose(feats.sum(1), GOLDEN_EVAL_SUM, rtol=1e-5)


def test_train_forward_updates_running_stats_like_torchvision(backbone, features):
  before = np.asarray(backbone.Conv2d_1a_3x3.bn.mean[...]).copy()
  model = nnx.clone(backbone)
  model.train()
  out = forward(model, golden_input())
  assert out.shape == (2, 1, 1, 2048) and bool(jnp.all(out >= 0))
  assert np.abs(out - features).max() > 0.1  # batch statistics, not the running ones
  for name, (mean, var) in GOLDEN_RUNNING.items():
    bn = get_module(model, name).bn
    np.testing.assert_allclose(bn.mean[...][:4], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.var[...][:4], var, rtol=1e-5)
  np.testing.assert_array_equal(backbone.Conv2d_1a_3x3.bn.mean[...], before)  # clone only
  assert np.abs(before[:4] - GOLDEN_RUNNING["Conv2d_1a_3x3"][0]).max() > 1e-3


def test_aux_head_matches_torchvision(torch_weights):
  aux = model_store.materialize(nnx.eval_shape(lambda: inception.InceptionAux(
      768, 1000, block_factory(jnp.float32), dtype=jnp.float32, rngs=nnx.Rngs(0))))
  convert.load_state_dict(aux, torch_weights, prefix="AuxLogits.")
  aux.eval()
  x = nhwc(np.random.default_rng(2).standard_normal((2, 768, 17, 17)).astype(np.float32))
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(aux, jnp.asarray(x)))
  np.testing.assert_allclose(logits[:, [0, 1, 2, 999]], GOLDEN_AUX, atol=1e-5)
  np.testing.assert_allclose(logits.sum(1), GOLDEN_AUX_SUM, atol=1e-4)
  exported = convert.export_state_dict(aux)
  assert set(exported) == {k[len("AuxLogits."):] for k in torch_weights
                           if k.startswith("AuxLogits.") and "num_batches" not in k}
  np.testing.assert_array_equal(exported["fc.weight"], torch_weights["AuxLogits.fc.weight"])


def test_bfloat16_compute_tracks_float32(backbone, torch_weights):
  """Mixed_6a (strided convs, max pool, concatenation) in bfloat16 vs the float32 block."""
  block = model_store.materialize(nnx.eval_shape(
      lambda: inception.InceptionB(288, block_factory(jnp.bfloat16))))
  convert.load_state_dict(block, torch_weights, prefix="Mixed_6a.")
  block.eval()
  assert block.branch3x3.conv.kernel[...].dtype == jnp.float32  # parameters stay float32
  x = jnp.asarray(np.random.default_rng(3).random((2, 7, 7, 288)), jnp.float32)
  run = nnx.jit(lambda m, x: m(x))
  half, full = run(block, x.astype(jnp.bfloat16)), run(backbone.Mixed_6a, x)
  assert half.dtype == jnp.bfloat16 and half.shape == full.shape == (2, 3, 3, 768)
  np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.05 * np.abs(full).max())
  assert np.abs(np.asarray(half, np.float32) - full).max() > 0  # it did compute in bfloat16


# --------------------------------------------------------------------------- conversion

def test_export_round_trip(backbone, torch_weights):
  exported = convert.export_state_dict(backbone)
  expected = {k for k in torch_weights if not k.startswith(("AuxLogits.", "fc."))
              and not k.endswith("num_batches_tracked")}
  assert set(exported) == expected
  for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_6b.branch7x7_2.conv.weight",
              "Mixed_7c.branch3x3dbl_3b.bn.running_var"):
    np.testing.assert_array_equal(exported[key], torch_weights[key])
  fresh = nnx.clone(backbone)
  state = nnx.state(fresh, model_store.WEIGHTS)
  nnx.update(fresh, jax.tree.map(lambda v: jax.device_put(np.zeros(v.shape, v.dtype)), state))
  assert not np.any(np.asarray(fresh.Mixed_7c.branch_pool.bn.var[...]))
  convert.load_state_dict(fresh, exported)
  again = weight_arrays(fresh)
  for key, value in weight_arrays(backbone).items():
    np.testing.assert_array_equal(again[key], value)


def test_mismatches_are_reported_together(backbone, torch_weights):
  broken = dict(torch_weights)
  del broken["Mixed_5c.branch5x5_2.bn.running_mean"]
  broken["Mixed_8a.conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  broken["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
  before = np.asarray(backbone.Mixed_5b.branch1x1.conv.kernel[...]).copy()
  with pytest.raises(convert.StateDictMismatchError) as err:
    convert.load_state_dict(backbone, broken)
  assert err.value.missing == ["Mixed_5c.branch5x5_2.bn.running_mean"]
  assert err.value.unexpected == ["Mixed_8a.conv.weight"]
  assert err.value.wrong_shape == [("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 7, 1),
                                    (128, 128, 1, 7))]
  assert "InceptionV3 (aux_logits=0, num_classes=0)" in str(err.value)
  np.testing.assert_array_equal(backbone.Mixed_5b.branch1x1.conv.kernel[...], before)


def test_heads_are_skipped_only_when_the_model_has_none(abstract_with_heads, torch_weights):
  headless = {k: v for k, v in torch_weights.items() if not k.startswith(("AuxLogits.", "fc."))}
  with pytest.raises(convert.StateDictMismatchError) as err:
    convert.load_state_dict(abstract_with_heads, headless)
  assert "fc.weight" in err.value.missing and "AuxLogits.fc.weight" in err.value.missing
  assert "AuxLogits.conv1.bn.running_var" in err.value.missing
  resized = dict(torch_weights, **{"AuxLogits.fc.weight": np.zeros((312, 768), np.float32)})
  with pytest.raises(convert.StateDictMismatchError) as err:
    convert.load_state_dict(abstract_with_heads, resized)
  assert err.value.wrong_shape == [("AuxLogits.fc.weight", (312, 768), (1000, 768))]
  assert convert.inception_options_from_state_dict(torch_weights) == {
      "aux_logits": 1000, "num_classes": 1000}
  with pytest.raises(convert.StateDictMismatchError, match="Conv2d_1a_3x3.conv.weight"):
    convert.inception_options_from_state_dict({"conv1.weight": np.zeros(1)})


# --------------------------------------------------------------------------- C-Tran

def abstract_tiny_ctran(num_labels=6, **overrides):
  """conftest's tiny ResNet C-Tran, shapes only (eager construction costs seconds)."""
  return nnx.eval_shape(lambda: CTran(num_labels, **{**TINY, **overrides}, rngs=nnx.Rngs(0)))


def reference_cub_state_dict(torch_weights, num_labels=5, hidden=32, seed=0):
  """A checkpoint shaped like the reference CUB C-Tran (``CTranModelCub``) with random values.

  The transformer's names and shapes come from a tiny ResNet C-Tran (they do not depend on
  the backbone, except the input width of ``projection``).
  """
  tiny = abstract_tiny_ctran(num_labels, hidden=hidden, layers=1)
  rng = np.random.default_rng(seed)
  sd = {k: (0.1 * rng.standard_normal(shape)).astype(np.float32)
        for k, (_, shape, _, _) in convert.torch_layout(tiny).items()
        if not k.startswith("backbone.")}
  sd["projection.weight"] = (0.02 * rng.standard_normal((hidden, 2048))).astype(np.float32)
  sd.update({convert.REFERENCE_BACKBONE_PREFIX + k: v for k, v in torch_weights.items()})
  sd["type_lt.weight"] = np.zeros((2, hidden), np.float32)  # defined, never used
  return sd


classify = nnx.jit(lambda model, feats, states: model.classify_features(feats, states))


@pytest.fixture(scope="module")
def cub_ctran(torch_weights):
  sd = reference_cub_state_dict(torch_weights)
  return sd, convert.from_reference(sd)


def test_ctran_with_inception_backbone(cub_ctran, features):
  sd, model = cub_ctran
  assert model.backbone_kind == "inception_v3" and isinstance(model.backbone, InceptionV3)
  assert model.backbone.AuxLogits is None and model.projection is not None
  np.testing.assert_allclose(forward(model.backbone, golden_input()), features, atol=1e-6)
  states = jnp.array([[-1, 0, 1, -1, 1], [1, 1, -1, 0, -1]], jnp.int32)
  logits = classify(model, features, states)["logits"]
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  exported = convert.export_state_dict(model)
  skipped = {k for k in sd if k == "type_lt.weight" or ".AuxLogits." in k or ".fc." in k
             or k.endswith("num_batches_tracked")}
  assert set(exported) == set(sd) - skipped
  np.testing.assert_array_equal(exported["label_lt.weight"], sd["label_lt.weight"])
  # 299x299 -> 8x8 = 64 image tokens + 5 label tokens
  image = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  logits, attention = nnx.eval_shape(lambda m, x, s: m(x, s, return_attention=True), model,
                                     image, states)
  assert logits.shape == (2, 5) and attention.shape == (1, 2, 69, 69)


def test_ctran_feature_dropout_only_with_inception_and_in_training(cub_ctran, features):
  _, model = cub_ctran
  assert model.feature_dropout.rate == 0.1 and abstract_tiny_ctran().feature_dropout is None
  states = jnp.full((2, 5), -1, jnp.int32)
  a = classify(model, features, states)["tokens"]  # eval mode: no dropout
  np.testing.assert_array_equal(a, classify(model, features, states)["tokens"])
  b = classify(nnx.view(model, deterministic=False), features, states)["tokens"]
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  assert model.feature_dropout.deterministic  # the view left the model in eval mode


def test_ctran_config_round_trip(cub_ctran):
  _, model = cub_ctran
  config = model_store.model_config(model)
  assert config["backbone"] == "inception_v3" and "backbone_depth" not in config
  rebuilt = nnx.eval_shape(model_store.constructor(config))
  assert isinstance(rebuilt.backbone, InceptionV3)
  assert model_store.model_config(rebuilt) == config
  with pytest.raises(ValueError, match="backbone must be one of"):
    CTran(3, backbone="vgg", rngs=nnx.Rngs(0))


def test_cli_converts_a_torchvision_inception(tmp_path, torch_weights, backbone, capsys):
  src = str(tmp_path / "inception_v3_google.npz")
  np.savez(src, **torch_weights)
  out = str(tmp_path / "inception")
  assert convert.main([src, "--out", out]) == 0
  assert "wrote InceptionV3 (aux_logits=0, num_classes=0" in capsys.readouterr().out
  restored = model_store.load_model(out)
  assert isinstance(restored, InceptionV3) and restored.AuxLogits is None
  assert restored.Mixed_7c.branch_pool.bn.use_running_average  # eval mode
  ours = weight_arrays(restored)
  for key, value in weight_arrays(backbone).items():
    np.testing.assert_array_equal(ours[key], value)


@pytest.mark.slow
def test_cli_keeps_heads_and_bfloat16_restore_runs(tmp_path, torch_weights, features):
  src = str(tmp_path / "inception_v3_google.npz")
  np.savez(src, **torch_weights)
  assert convert.main([src, "--out", str(tmp_path / "m"), "--keep-heads"]) == 0
  restored = model_store.load_model(str(tmp_path / "m"), dtype=jnp.bfloat16)
  assert (restored.aux_logits, restored.num_classes) == (1000, 1000)
  np.testing.assert_array_equal(restored.fc.kernel[...], torch_weights["fc.weight"].T)
  half = forward(restored, golden_input())
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), features, atol=0.05)


@pytest.mark.slow
def test_initialisation_follows_torchvision():
  make = model_store.constructor({"kind": "inception_v3", "aux_logits": 10, "num_classes": 0})
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  fresh = nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())
  kernel = np.asarray(fresh.Conv2d_1a_3x3.conv.kernel[...])
  assert 0.07 < kernel.std() < 0.1 and np.abs(kernel).max() <= 0.2  # N(0, 0.1) cut at 2 std
  aux_fc = np.asarray(fresh.AuxLogits.fc.kernel[...])
  assert aux_fc.shape == (768, 10) and np.abs(aux_fc).max() <= 0.002  # N(0, 0.001)
  assert model_store.model_config(fresh) == {"kind": "inception_v3", "aux_logits": 10,
                                             "num_classes": 0}
