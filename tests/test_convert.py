"""Weight import: state-dict checks, file formats, round trips and the CLI."""

import os
import pickle
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_inputs, tiny_ctran

from ctran_jax import convert, model_store


@pytest.fixture(scope="module")
def exported(tiny_model):
  """The tiny model as the reference repo would save it (torch names and layouts)."""
  return convert.export_state_dict(tiny_model)


def test_export_uses_reference_names_and_torch_layouts(exported, tiny_model):
  assert exported["label_lt.weight"].shape == (6, 32)
  assert exported["known_label_lt.weight"].shape == (3, 32)
  assert exported["output_linear.weight"].shape == (6, 32)
  assert exported["self_attn_layers.1.transformer_layer.self_attn.in_proj_weight"].shape == (
      96, 32)
  conv = exported["backbone.base_network.layer2.0.conv2.weight"]  # OIHW, stride-2 3x3
  assert conv.shape == (16, 16, 3, 3)
  np.testing.assert_array_equal(
      conv[:, :, 1, 2], np.asarray(tiny_model.backbone.layer2[0].conv2.kernel[...])[1, 2].T)
  assert "backbone.base_network.layer1.0.downsample.1.running_var" in exported


def test_from_reference_round_trip_infers_the_architecture(exported, tiny_model):
  model = convert.from_reference(exported, heads=4)
  assert (model.num_labels, model.hidden, len(model.encoder)) == (6, 32, 2)
  assert model.backbone.stage_sizes == (1, 1, 1, 1) and model.backbone.block == "bottleneck"
  assert model.projection is not None
  images, states = random_inputs()
  np.testing.assert_allclose(model(images, states), tiny_model(images, states), atol=1e-6)


def test_wrong_label_count_names_the_keys(exported):
  model_80 = tiny_ctran(num_labels=80)
  with pytest.raises(convert.StateDictMismatchError) as err:
    convert.load_state_dict(model_80, exported)
  message = str(err.value)
  for key in ("label_lt.weight", "output_linear.weight", "output_linear.bias"):
    assert key in message
  assert "checkpoint (6, 32), model expects (80, 32)" in message
  assert {k for k, _, _ in err.value.wrong_shape} == {
      "label_lt.weight", "output_linear.weight", "output_linear.bias"}


def test_missing_unexpected_and_misshaped_keys_reported_together(exported):
  broken = dict(exported)
  del broken["LayerNorm.bias"]
  broken["extra_head.weight"] = np.zeros((3,), np.float32)
  broken["self_attn_layers.0.transformer_layer.linear1.bias"] = np.zeros((7,), np.float32)
  model = tiny_ctran()
  before = np.asarray(model.input_norm.scale[...]).copy()
  with pytest.raises(convert.StateDictMismatchError) as err:
    convert.load_state_dict(model, broken)
  assert err.value.missing == ["LayerNorm.bias"]
  assert err.value.unexpected == ["extra_head.weight"]
  assert [k for k, _, _ in err.value.wrong_shape] == [
      "self_attn_layers.0.transformer_layer.linear1.bias"]
  np.testing.assert_array_equal(model.input_norm.scale[...], before)  # nothing half-loaded


def test_ignored_torch_buffers(exported, tiny_model):
  extra = dict(exported, **{"backbone.base_network.fc.weight": np.zeros((10, 256)),
                            "backbone.base_network.bn1.num_batches_tracked": np.array(3)})
  model = convert.from_reference(extra)
  images, states = random_inputs()
  np.testing.assert_allclose(model(images, states), tiny_model(images, states), atol=1e-6)


def test_prefix_loads_a_reference_backbone_into_a_resnet(exported, tiny_model):
  resnet = tiny_ctran(seed=3).backbone
  convert.load_state_dict(resnet, exported, prefix=convert.REFERENCE_BACKBONE_PREFIX)
  images, _ = random_inputs()
  np.testing.assert_allclose(resnet(images), tiny_model.backbone(images), atol=1e-5)


def test_torchvision_backbone_import(tiny_model):
  backbone_sd = convert.export_state_dict(tiny_model.backbone)
  assert "conv1.weight" in backbone_sd and "layer4.0.conv3.weight" in backbone_sd
  backbone_sd["fc.weight"] = np.zeros((1000, 256), np.float32)  # torchvision files carry fc
  backbone_sd["fc.bias"] = np.zeros((1000,), np.float32)
  resnet = convert.resnet_from_torchvision(backbone_sd)
  images, _ = random_inputs()
  np.testing.assert_allclose(resnet(images), tiny_model.backbone(images), atol=1e-5)
  # The usual ImageNet initialisation: load a torchvision ResNet into a fresh C-Tran.
  fresh = tiny_ctran(seed=1)
  convert.load_state_dict(fresh.backbone, backbone_sd)
  np.testing.assert_allclose(fresh.backbone(images), resnet(images), atol=1e-5)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_file_formats(tmp_path, exported, ext):
  path = str(tmp_path / f"ckpt{ext}")
  if ext == ".npz":
    np.savez(path, **exported)
  else:
    from safetensors.numpy import save_file
    save_file(exported, path)
  loaded = convert.read_state_dict(path)
  assert set(loaded) == set(exported)
  np.testing.assert_array_equal(loaded["label_lt.weight"], exported["label_lt.weight"])


def test_wrapped_and_dataparallel_state_dicts():
  sd = {"module.a.weight": np.ones(2), "module.b.bias": np.zeros(1)}
  assert set(convert._unwrap({"state_dict": sd, "epoch": 3}, "x")) == {"a.weight", "b.bias"}
  with pytest.raises(ValueError, match="no state dict found"):
    convert._unwrap({}, "x.pth")


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not really a zip")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r"pip install torch.*\.npz or \.safetensors"):
    convert.read_state_dict(str(path))


class FakeTorch(types.ModuleType):
  """Stands in for torch (not installed in CI): ``load`` behaves like torch's for a file."""

  def __init__(self, result=None, error=None):
    super().__init__("torch")
    self.result, self.error, self.calls = result, error, []

  def load(self, path, map_location=None, weights_only=True):
    self.calls.append(weights_only)
    if self.error and weights_only:
      raise self.error
    return self.result


def test_pth_through_torch_load(tmp_path, monkeypatch, exported):
  path = tmp_path / "model.pth"
  path.write_bytes(b"")
  fake = FakeTorch(result={"state_dict": {f"module.{k}": v for k, v in exported.items()}})
  monkeypatch.setitem(sys.modules, "torch", fake)
  assert set(convert.read_state_dict(str(path))) == set(exported)
  assert fake.calls == [True]  # weights_only unless the user trusts the file


def test_pth_with_pickled_extras_needs_trust(tmp_path, monkeypatch, exported):
  path = tmp_path / "model.pth"
  path.write_bytes(b"")
  error = pickle.UnpicklingError("Weights only load failed. ... WeightsUnpickler error: "
                                 "Unsupported global: GLOBAL numpy._core.multiarray.scalar")
  fake = FakeTorch(result={"state_dict": exported, "valid_mAP": 0.8}, error=error)
  monkeypatch.setitem(sys.modules, "torch", fake)
  with pytest.raises(ValueError, match="--trust-pickle"):
    convert.read_state_dict(str(path))
  assert set(convert.read_state_dict(str(path), trust_pickle=True)) == set(exported)
  assert fake.calls == [True, False]


def test_unreadable_pth_is_named(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"garbage")
  error = pickle.UnpicklingError("Weights only load failed. WeightsUnpickler error: \n\n"
                                 "Unsupported operand 103\n")
  monkeypatch.setitem(sys.modules, "torch", FakeTorch(error=error))
  with pytest.raises(ValueError, match=r"model.pth: not a readable torch checkpoint "
                                       r"\(Unsupported operand 103\)"):
    convert.read_state_dict(str(path))


def test_unknown_extension_and_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    convert.read_state_dict(str(tmp_path / "nope.npz"))
  (tmp_path / "w.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint format '.h5'"):
    convert.read_state_dict(str(tmp_path / "w.h5"))


def test_cli_converts_and_the_result_restores(tmp_path, exported, tiny_model):
  src = str(tmp_path / "ctran.npz")
  np.savez(src, **exported)
  out = str(tmp_path / "converted")
  assert convert.main([src, "--out", out]) == 0
  restored = model_store.load_model(out)
  images, states = random_inputs()
  np.testing.assert_allclose(restored(images, states), tiny_model(images, states), atol=1e-6)
  np.testing.assert_array_equal(restored.backbone.bn1.mean[...], tiny_model.backbone.bn1.mean[...])
  # bfloat16 compute can be chosen at restore time; parameters stay float32
  assert model_store.load_model(out, dtype=jnp.bfloat16).backbone(images).dtype == jnp.bfloat16


def test_cli_errors_are_one_line_messages(tmp_path, exported, capsys):
  assert convert.main([str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
  assert "checkpoint file not found" in capsys.readouterr().err
  src = str(tmp_path / "bad.npz")
  np.savez(src, **{k: v for k, v in exported.items() if k != "LayerNorm.weight"})
  assert convert.main([src, "--out", str(tmp_path / "o")]) == 2
  assert "missing key(s): LayerNorm.weight" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o" / "model.json")


def test_cli_rejects_a_file_that_is_no_known_model(tmp_path, capsys):
  src = str(tmp_path / "other.npz")
  np.savez(src, **{"encoder.weight": np.zeros((2, 2))})
  assert convert.main([src, "--out", str(tmp_path / "o")]) == 2
  assert "neither a reference C-Tran checkpoint" in capsys.readouterr().err


def test_cli_takes_the_backbone_of_a_reference_checkpoint(tmp_path, exported, tiny_model):
  src = str(tmp_path / "ctran.npz")
  np.savez(src, **exported)
  out = str(tmp_path / "backbone")
  assert convert.main([src, "--out", out, "--backbone-only"]) == 0
  images, _ = random_inputs()
  np.testing.assert_allclose(model_store.load_model(out)(images), tiny_model.backbone(images),
                             atol=1e-5)


def test_cli_refuses_to_overwrite(tmp_path, exported):
  src = str(tmp_path / "ctran.npz")
  np.savez(src, **exported)
  out = str(tmp_path / "converted")
  assert convert.main([src, "--out", out]) == 0
  assert convert.main([src, "--out", out]) == 2


def test_load_model_on_a_directory_without_a_model(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m ctran_jax.convert"):
    model_store.load_model(str(tmp_path))


def test_module_entry_point(tmp_path, exported):
  src = str(tmp_path / "ctran.npz")
  np.savez(src, **exported)
  result = subprocess.run(
      [sys.executable, "-m", "ctran_jax.convert", src, "--out", str(tmp_path / "m")],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "wrote CTran (num_labels=6, hidden=32, layers=2" in result.stdout


def test_restored_model_comes_back_in_eval_mode(tmp_path, exported):
  src = str(tmp_path / "ctran.npz")
  np.savez(src, **exported)
  assert convert.main([src, "--out", str(tmp_path / "m")]) == 0
  model = model_store.load_model(str(tmp_path / "m"))
  assert isinstance(model, nnx.Module)
  assert model.encoder[0].dropout1.deterministic and model.backbone.bn1.use_running_average
