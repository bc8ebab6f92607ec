"""Numerical parity with the reference PyTorch C-Tran (ResNet-101, 80 labels).

Golden arrays were produced by the reference code on weights drawn by the scheme that
``synthetic_weights`` implements; tolerances are those the parity README observed between
torch float32 and an independent float64 recompute (see tests/data/parity/README.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from synthetic_weights import PARITY_DIR, sha256_fingerprint, synthetic_state_dict

from ctran_jax import convert
from ctran_jax.losses import masked_bce


def nhwc(images_nchw):
  return np.transpose(images_nchw, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden():
  with np.load(PARITY_DIR / "ctran_coco_r101.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference_weights(golden):
  weights = synthetic_state_dict(str(PARITY_DIR / "spec_ctran_coco.json"),
                                 int(golden["weights_seed"]))
  return weights


@pytest.fixture(scope="module")
def model(reference_weights):
  return convert.from_reference(reference_weights, heads=4)


backbone_fn = nnx.jit(lambda m, x: m.backbone(x))
classify_fn = nnx.jit(lambda m, f, s: m.classify_features(f, s))


@pytest.fixture(scope="module")
def outputs(model, golden):
  """Everything the eval-mode forward produces, per image size, computed once."""
  out = {}
  nolmt = nnx.view(model, use_lmt=False)
  for size in (64, 224):
    features = backbone_fn(model, nhwc(golden[f"images_{size}"]))
    out[size] = {
        "features": np.asarray(features),
        "mask": jax_to_np(classify_fn(model, features, golden["mask"])),
        "allunk": jax_to_np(classify_fn(model, features, golden["mask_all_unknown"])),
        "nolmt": jax_to_np(classify_fn(nolmt, features, golden["mask"])),
    }
  return out


def jax_to_np(tree):
  return {k: np.asarray(v) for k, v in tree.items()}


def test_synthetic_weights_follow_the_documented_scheme(reference_weights, golden):
  assert list(reference_weights) == list(golden["param_names"])
  sums = np.array([np.asarray(v, np.float64).sum() for v in reference_weights.values()])
  np.testing.assert_allclose(sums, golden["param_sums"], rtol=1e-12, atol=1e-9)
  assert sha256_fingerprint(reference_weights) == str(golden["param_sha256"])


def test_inferred_architecture(model):
  assert model.num_labels == 80 and model.hidden == 2048 and len(model.encoder) == 3
  assert model.backbone.depth == 101 and model.projection is None
  assert model.encoder[0].heads == 4 and model.encoder[0].linear1.out_features == 2048


@pytest.mark.parametrize("size", [64, 224])
def test_feature_map(outputs, golden, size):
  want = nhwc(golden[f"feat_{size}"])
  got = outputs[size]["features"]
  assert got.shape == want.shape
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("variant,golden_key", [
    ("mask", "logits_{}"), ("allunk", "logits_{}_allunk"), ("nolmt", "logits_{}_nolmt")])
def test_logits(outputs, golden, size, variant, golden_key):
  np.testing.assert_allclose(outputs[size][variant]["logits"], golden[golden_key.format(size)],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [64, 224])
def test_attention_per_layer(outputs, golden, size):
  got = outputs[size]["mask"]["attention"]
  assert got.shape == golden[f"attn_{size}"].shape  # (layers, B, S, S)
  np.testing.assert_allclose(got, golden[f"attn_{size}"], atol=1e-5, rtol=0)


def test_input_layernorm_and_last_hidden_state(outputs, golden):
  np.testing.assert_allclose(outputs[64]["mask"]["tokens"], golden["embeddings_ln_64"],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(outputs[64]["mask"]["hidden"], golden["hidden_out_64"],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [64, 224])
def test_summed_bce_losses(outputs, golden, size):
  logits = outputs[size]["mask"]["logits"]
  unknown_only = masked_bce(logits, golden["labels"], golden["mask"], reduction="sum")
  all_labels = masked_bce(logits, golden["labels"], reduction="sum")
  # loss.labels="all" (the reference's --loss_labels all): known entries count too.
  all_with_states = masked_bce(logits, golden["labels"], golden["mask"], reduction="sum",
                               labels_in_loss="all")
  np.testing.assert_allclose(unknown_only, golden[f"loss_unk_sum_{size}"], rtol=1e-5)
  np.testing.assert_allclose(all_labels, golden[f"loss_all_sum_{size}"], rtol=1e-5)
  np.testing.assert_allclose(all_with_states, golden[f"loss_all_sum_{size}"], rtol=1e-5)
  mean_all = masked_bce(logits, golden["labels"], golden["mask"], reduction="mean",
                        labels_in_loss="all")
  np.testing.assert_allclose(mean_all, golden[f"loss_all_sum_{size}"] / logits.size, rtol=1e-5)
  # The reference's run_epoch reports the sum divided by the number of samples.
  np.testing.assert_allclose(unknown_only / len(logits), golden[f"runepoch_loss_unk_{size}"],
                             rtol=1e-5)


def _loss(m, images, states, labels):
  return masked_bce(m(images, states), labels, states, reduction="sum")


def _gradients(model, golden):
  grads = nnx.jit(nnx.grad(_loss))(model, nhwc(golden["images_64"]), golden["mask"],
                                  golden["labels"])
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def gradients(model, golden):
  return _gradients(model, golden)


# README tolerances: max|got - want| <= tol * max|want|.
GRADIENT_TOLERANCE = {"output_linear.bias": 1e-4, "backbone.base_network.conv1.weight": 5e-3}
# Float32 only: sample 1 / label 26 has an FFN pre-activation in layer 0 of 9e-7 (float64),
# below float32 rounding, so its ReLU gate may differ from torch's float32 run; measured
# 2.0e-3 here. The float64 test below holds this array to the README's 1e-3.
FLOAT32_RELU_GATE_TOLERANCE = {"label_lt.weight": 1e-2}


def _check_gradients(model, grads, golden, tolerances):
  layout = convert.torch_layout(model)
  names = [k[len("grad_64__"):] for k in golden if k.startswith("grad_64__")]
  assert len(names) == 8
  errors = {}
  for name in names:
    path, _, to_flax, _ = layout[name]
    want = to_flax(golden["grad_64__" + name])
    errors[name] = np.abs(grads[path] - want).max() / np.abs(want).max()
  bad = {n: e for n, e in errors.items() if not e <= tolerances.get(n, 1e-3)}
  assert not bad, f"relative gradient errors over tolerance: {bad}"


def test_gradients_float32(model, gradients, golden):
  _check_gradients(model, gradients, golden,
                   {**GRADIENT_TOLERANCE, **FLOAT32_RELU_GATE_TOLERANCE})


def test_gradients_float64_at_reference_tolerances(reference_weights, golden):
  with jax.enable_x64(True):
    model = convert.from_reference(reference_weights, heads=4, dtype=jnp.float64)
    grads = _gradients(model, golden)
  _check_gradients(model, grads, golden, GRADIENT_TOLERANCE)


def test_unknown_state_row_gets_exactly_zero_gradient(model, gradients, golden):
  path = convert.torch_layout(model)["known_label_lt.weight"][0]
  grad = gradients[path]
  assert np.all(grad[0] == 0.0)
  assert np.abs(grad[1:]).max() > 0  # the known rows do train
  assert np.all(golden["grad_64__known_label_lt.weight"][0] == 0.0)


def test_train_mode_batchnorm_logits_and_running_statistics(reference_weights, golden):
  model = convert.from_reference(reference_weights, heads=4, dropout=0.0)
  model.train()
  logits = nnx.jit(lambda m, x, s: m(x, s))(model, nhwc(golden["images_64"]), golden["mask"])
  np.testing.assert_allclose(logits, golden["logits_64_trainbn_nodropout"], atol=5e-3, rtol=0)
  for bn, module, rtol in (("bn1", model.backbone.bn1, 1e-5),
                           ("layer4.2.bn3", model.backbone.layer4[2].bn3, 1e-3)):
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      want = golden[f"after_train_fwd__{bn}.{theirs}"]
      # relative to the largest entry: running means sit near 0, elementwise rtol is noise
      np.testing.assert_allclose(getattr(module, ours)[...], want, rtol=0,
                                 atol=rtol * np.abs(want).max(), err_msg=f"{bn}.{theirs}")
    # and they really moved away from the imported values
    before = reference_weights[f"backbone.base_network.{bn}.running_var"]
    assert np.abs(module.var[...] - before).max() > 1e-3
