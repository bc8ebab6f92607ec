"""Using a trained model: export_model, predict (tables, JSON, known labels, errors), attention.

One tiny run on ``ctran_demo/tiny`` is trained and exported per module; the images are demo
test images written to files in every supported format.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import REPO, tiny_run_config
from PIL import Image

from ctran_jax import model_store, predict, thresholds, train
from ctran_jax.data import pipeline


@pytest.fixture(scope="module")
def trained(trained_tiny):
  return trained_tiny


@pytest.fixture(scope="module")
def images(demo_data_dir, tmp_path_factory):
  """Demo test images as files: {name: (path, the RGB pixels a reader should see)}."""
  folder = tmp_path_factory.mktemp("images")
  ds = tfds.builder("ctran_demo/tiny", data_dir=demo_data_dir).as_dataset(split="test")
  pixels = [ex["image"] for ex in tfds.as_numpy(ds.take(3))]
  out = {}
  for i, fmt in enumerate(("png", "bmp", "webp")):  # lossless formats: exact pixels
    path = str(folder / f"img{i}.{fmt}")
    Image.fromarray(pixels[i]).save(path, lossless=True) if fmt == "webp" else \
        Image.fromarray(pixels[i]).save(path)
    out[fmt] = (path, pixels[i])
  gray = str(folder / "gray.png")
  Image.fromarray(pixels[0][..., 0]).save(gray)
  out["gray"] = (gray, np.repeat(pixels[0][..., :1], 3, axis=-1))
  rgba = str(folder / "rgba.png")
  Image.fromarray(np.dstack([pixels[1], np.full(pixels[1].shape[:2], 255, np.uint8)])).save(rgba)
  out["rgba"] = (rgba, pixels[1])
  gif = str(folder / "anim.gif")
  Image.fromarray(pixels[2]).save(gif)
  out["gif"] = (gif, np.asarray(Image.open(gif).convert("RGB")))
  # A JPEG stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view").
  rotated = str(folder / "rotated.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(np.rot90(pixels[0], k=1)).save(rotated, exif=exif, quality=100)
  out["exif"] = (rotated, None)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  out["broken"] = (str(folder / "broken.jpg"), None)
  return out


def run(predictor, paths, **kwargs):
  out, err = io.StringIO(), io.StringIO()
  options = dict(known={}, top=0, threshold=None, as_json=True, attention_dir=None)
  status = predict.run(paths, predictor, **{**options, **kwargs}, out=out, err=err)
  records = [json.loads(line) for line in out.getvalue().splitlines() if line]
  return status, records, err.getvalue()


def model_probabilities(model_dir, pixels, states):
  """sigmoid(model(eval transform of the pixels, states)), computed independently."""
  info = model_store.read_info(model_dir)
  model = model_store.load_model(model_dir)
  inputs = np.stack([np.asarray(pipeline.eval_image(p, info["transform"])) for p in pixels])
  return np.asarray(jax.nn.sigmoid(model(inputs, np.asarray(states, np.int32))))


def test_model_directory_describes_itself(trained):
  workdir, model_dir = trained
  info = model_store.read_info(model_dir)
  assert info["labels"][:3] == ["bands", "checker", "diamond"] and len(info["labels"]) == 16
  assert info["transform"] == {"transform": "ctran", "image_size": 32, "scale_size": 36,
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
  assert info["source"]["step"] == 8 and info["source"]["dataset"] == "ctran_demo/tiny"
  assert info["config"] == train.model_from_config(tiny_run_config(None), 16).description
  fitted = thresholds.load(os.path.join(model_dir, "thresholds.json"))
  assert fitted["step"] == 8 and fitted["fitted_on"] == "validation"


def test_json_matches_the_model_and_known_labels_move_the_others(trained, images):
  _, model_dir = trained
  predictor = predict.Predictor.from_directory(model_dir, batch_size=2)
  names = ("png", "bmp", "webp")
  paths = [images[n][0] for n in names]
  status, records, err = run(predictor, paths)
  assert status == 0 and not err
  expected = model_probabilities(model_dir, [images[n][1] for n in names],
                                 np.full((3, 16), -1))
  for rec, probs in zip(records, expected, strict=True):
    np.testing.assert_allclose([e["probability"] for e in rec["labels"]], probs, atol=1e-5)
  labels = predictor.labels
  _, given, _ = run(predictor, paths, known={labels[0]: 1, labels[5]: 0})
  states = np.full((3, 16), -1)
  states[:, 0], states[:, 5] = 1, 0
  expected_known = model_probabilities(model_dir, [images[n][1] for n in names], states)
  for rec, before, probs in zip(given, records, expected_known, strict=True):
    assert rec["known"] == {labels[0]: 1, labels[5]: 0}
    assert rec["labels"][0] == {"label": labels[0], "probability": 1.0, "predicted": True,
                                "threshold": None, "known": True}
    assert rec["labels"][5]["known"] and rec["labels"][5]["predicted"] is False
    others = [e["probability"] for i, e in enumerate(rec["labels"]) if i not in (0, 5)]
    np.testing.assert_allclose(others, np.delete(probs, [0, 5]), atol=1e-5)
    unchanged = [e["probability"] for i, e in enumerate(before["labels"]) if i not in (0, 5)]
    assert np.max(np.abs(np.array(others) - unchanged)) > 1e-4  # the given labels mattered


def test_every_image_kind_is_read_as_rgb_with_exif_orientation(images):
  for name in ("png", "bmp", "webp", "gray", "rgba", "gif"):
    path, pixels = images[name]
    np.testing.assert_array_equal(predict.read_image(path), pixels, err_msg=name)
  stored = np.asarray(Image.open(images["exif"][0]).convert("RGB"))  # sideways, as stored
  upright = predict.read_image(images["exif"][0])
  np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))  # orientation 6 applied


def test_bad_inputs_are_one_line_errors(trained, images):
  _, model_dir = trained
  predictor = predict.Predictor.from_directory(model_dir)
  status, records, err = run(predictor, [images["png"][0], images["broken"][0],
                                         "/no/such/file.jpg"])
  assert status == 1 and len(records) == 1
  lines = err.strip().splitlines()
  assert len(lines) == 2 and "broken.jpg: not a readable image" in lines[0]
  assert "/no/such/file.jpg: no such file" in lines[1]
  with pytest.raises(ValueError, match="unknown label 'dics'; did you mean disc"):
    predictor.label_states({"dics": 1})
  with pytest.raises(ValueError, match="must be 1 .present. or 0"):
    predict.parse_known(["disc=2"])
  with pytest.raises(ValueError, match="expected NAME=1 or NAME=0"):
    predict.parse_known(["disc"])


def test_thresholds_calibrated_half_or_a_number(trained, images):
  _, model_dir = trained
  predictor = predict.Predictor.from_directory(model_dir)
  fitted = thresholds.load(os.path.join(model_dir, "thresholds.json"))["thresholds"]
  _, (calibrated,), _ = run(predictor, [images["png"][0]])
  assert calibrated["threshold"] == "calibrated"
  np.testing.assert_allclose([e["threshold"] for e in calibrated["labels"]], fitted)
  for e in calibrated["labels"]:
    assert e["predicted"] == (e["probability"] >= e["threshold"])
  _, (half,), _ = run(predictor, [images["png"][0]], threshold="0.5")
  assert half["threshold"] == 0.5 and all(e["threshold"] == 0.5 for e in half["labels"])
  _, (zero,), _ = run(predictor, [images["png"][0]], threshold="0")
  assert all(e["predicted"] for e in zero["labels"])


def test_attention_maps_are_written(trained, images, tmp_path):
  _, model_dir = trained
  predictor = predict.Predictor.from_directory(model_dir)
  status, _, _ = run(predictor, [images["png"][0]], attention_dir=str(tmp_path),
                     known={"disc": 1}, top=2)
  assert status == 0
  maps = np.load(tmp_path / "img0.npy")
  assert maps.shape == (16, 1, 1)  # a 32x32 input gives a 1x1 feature map
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  with Image.open(tmp_path / "img0.png") as png:
    assert png.format == "PNG" and png.size[0] > 200


def test_command_line_table_and_exit_status(trained, images):
  workdir, model_dir = trained
  base = [sys.executable, "-m", "ctran_jax.predict"]
  out = subprocess.run(base + [f"--model={model_dir}", images["png"][0], images["broken"][0],
                               "--known=disc=1", "--top=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "disc" in out.stdout and "given" in out.stdout and "(12 more below" in out.stdout
  assert "error:" in out.stderr and "broken.jpg" in out.stderr and "Traceback" not in out.stderr
  out = subprocess.run(base + [f"--workdir={workdir}", "--checkpoint=latest", "--json",
                               images["png"][0]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["image"] == images["png"][0]
  out = subprocess.run(base + [f"--model={model_dir}", "--known=dics=1", images["png"][0]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "did you mean disc" in out.stderr
  assert "Traceback" not in out.stderr


def test_older_model_directory_is_a_clear_error(trained, tmp_path):
  _, model_dir = trained
  info = model_store.read_info(model_dir)
  (tmp_path / "model.json").write_text(json.dumps({**info, "format": "ctran_jax/model/v1"}))
  with pytest.raises(ValueError, match="format 'ctran_jax/model/v1'.*export or convert"):
    predict.Predictor.from_directory(str(tmp_path))


def test_training_starts_from_an_exported_model(trained, demo_data_dir):
  """``model.init_from=DIR`` (fine-tuning an exported model): the initial train state holds
  the model directory's weights, not fresh ones."""
  from flax import nnx
  from helpers import tiny_run_config

  from ctran_jax import sharding

  _, model_dir = trained
  num_labels = len(model_store.read_info(model_dir)["labels"])
  expected = nnx.to_pure_dict(nnx.state(model_store.load_model(model_dir), nnx.Param))
  mesh = sharding.make_mesh(1, 1)
  for init_from, same in ((model_dir, True), ("", False)):
    config = tiny_run_config(demo_data_dir, **{"model.init_from": init_from})
    model_def = train.model_from_config(config, num_labels)
    tx, _ = train.make_optimizer(config, 8)
    _, init = train.train_state(config, mesh, model_def, tx)
    got = nnx.to_pure_dict(init()["params"])
    equal = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got,
                                         expected))
    assert all(equal) if same else not all(equal), init_from
