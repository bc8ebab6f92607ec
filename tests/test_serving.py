"""Export for serving: jax.export artefacts and a TF SavedModel, each run in a fresh process.

One tiny run on ``ctran_demo/tiny`` is trained, exported to a model directory and then to a
serving directory per module. The artefacts are loaded in processes that import only jax
(the ``.jax`` files) or only tensorflow (the SavedModel), on one device: ctran_jax, flax
and the other framework are made unimportable there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctran_jax import model_store, serving

NUM_LABELS, SIZE = 16, 32


@pytest.fixture(scope="module")
def served(trained_tiny, tmp_path_factory):
  _, model_dir = trained_tiny
  out = str(tmp_path_factory.mktemp("serving") / "serving")
  assert serving.main(["--model", model_dir, "--out", out]) == 0
  return model_dir, out


@pytest.fixture(scope="module")
def cases(demo_data_dir, served, tmp_path_factory):
  """Inputs (batch 1 and 3, no label / some labels known, uint8 and float32 images) in an
  .npz for the fresh processes, and the model's own probabilities for each."""
  model_dir, _ = served
  ds = tfds.builder("ctran_demo/tiny", data_dir=demo_data_dir).as_dataset(split="test")
  pixels = np.stack([ex["image"][:SIZE, :SIZE] for ex in tfds.as_numpy(ds.take(3))])
  assert pixels.shape == (3, SIZE, SIZE, 3) and pixels.dtype == np.uint8
  transform = model_store.read_info(model_dir)["transform"]
  mean, std = np.float32(transform["mean"]), np.float32(transform["std"])
  normalised = ((pixels.astype(np.float32) / 255 - mean) / std).astype(np.float32)
  unknown = np.full((3, NUM_LABELS), -1, np.int32)
  known = unknown.copy()
  known[0, [0, 5]] = 1, 0
  known[1, [2, 3, 9]] = 0, 1, 1
  known[2, 7] = 1
  model = model_store.load_model(model_dir)
  # One (eager) model call for both state sets; eval mode: every row is computed alone.
  both = np.asarray(jax.nn.sigmoid(model(np.concatenate([normalised, normalised]),
                                         np.concatenate([unknown, known]))))
  inputs, expected = {}, {}
  for batch in (1, 3):
    for name, states, probs in (("unknown", unknown, both[:3]), ("known", known, both[3:])):
      key = f"{name}{batch}"
      inputs[f"{key}_uint8"], inputs[f"{key}_float32"] = pixels[:batch], normalised[:batch]
      inputs[f"{key}_states"] = states[:batch]
      expected[key] = probs[:batch]
  path = str(tmp_path_factory.mktemp("cases") / "inputs.npz")
  np.savez(path, **inputs)
  return path, expected


def fresh_process(script: str, cwd) -> dict:
  """Run `script` in a new interpreter on one CPU device (not conftest's 8); the script
  makes the packages it must not need unimportable and prints one JSON line last."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("PYTHONPATH", None)
  out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


JAX_SCRIPT = """
import json, sys
for name in ("ctran_jax", "flax", "tensorflow"):
  sys.modules[name] = None  # importing them would fail: the artefact needs jax only
import jax, numpy as np
inputs = np.load({inputs!r})
result = {{"devices": jax.device_count()}}
for kind, name in (("uint8", "probabilities_uint8.jax"), ("float32", "probabilities_float32.jax")):
  with open({out!r} + "/" + name, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  result[kind + "_in"] = [str(a) for a in exported.in_avals]
  result[kind + "_out"] = [str(a) for a in exported.out_avals]
  for key in {keys!r}:
    probs = exported.call(inputs[key + "_" + kind], inputs[key + "_states"])
    result[key + "_" + kind] = np.asarray(probs).tolist()
    result[key + "_" + kind + "_dtype"] = str(probs.dtype)
print(json.dumps(result))
"""

TF_SCRIPT = """
import json, sys
for name in ("ctran_jax", "flax", "jax"):
  sys.modules[name] = None  # importing them would fail: the SavedModel needs tensorflow only
import numpy as np
import tensorflow as tf
inputs = np.load({inputs!r})
model = tf.saved_model.load({out!r} + "/saved_model/1")
result = {{"signatures": sorted(model.signatures)}}
for signature, kind in (("serving_default", "uint8"), ("serving_normalized", "float32")):
  serve = model.signatures[signature]
  result[signature + "_in"] = {{k: [v.dtype.name, v.shape.as_list()]
                                for k, v in serve.structured_input_signature[1].items()}}
  result[signature + "_out"] = {{k: [v.dtype.name, v.shape.as_list()]
                                 for k, v in serve.structured_outputs.items()}}
  for key in {keys!r}:
    out = serve(images=tf.constant(inputs[key + "_" + kind]),
                label_states=tf.constant(inputs[key + "_states"]))
    result[key + "_" + kind] = out["probabilities"].numpy().tolist()
print(json.dumps(result))
"""


def test_jax_export_artefacts_match_the_model(served, cases, tmp_path):
  _, out = served
  inputs, expected = cases
  result = fresh_process(JAX_SCRIPT.format(inputs=inputs, out=out, keys=sorted(expected)),
                         tmp_path)
  assert result["devices"] == 1
  assert result["uint8_in"] == [f"uint8[b,{SIZE},{SIZE},3]", f"int32[b,{NUM_LABELS}]"]
  assert result["float32_in"] == [f"float32[b,{SIZE},{SIZE},3]", f"int32[b,{NUM_LABELS}]"]
  assert result["uint8_out"] == result["float32_out"] == [f"float32[b,{NUM_LABELS}]"]
  for key, probs in expected.items():
    for kind in ("uint8", "float32"):
      assert result[f"{key}_{kind}_dtype"] == "float32"
      np.testing.assert_allclose(result[f"{key}_{kind}"], probs, atol=1e-5,
                                 err_msg=f"{key} {kind}")
  # The known labels changed the others' probabilities (the states really entered the model).
  assert np.abs(expected["known3"] - expected["unknown3"]).max() > 1e-4


def test_saved_model_signatures_match_the_model(served, cases, tmp_path):
  _, out = served
  inputs, expected = cases
  result = fresh_process(TF_SCRIPT.format(inputs=inputs, out=out, keys=sorted(expected)),
                         tmp_path)
  assert result["signatures"] == ["serving_default", "serving_normalized"]
  for signature, dtype in (("serving_default", "uint8"), ("serving_normalized", "float32")):
    assert result[f"{signature}_in"] == {"images": [dtype, [None, SIZE, SIZE, 3]],
                                         "label_states": ["int32", [None, NUM_LABELS]]}
    assert result[f"{signature}_out"] == {"probabilities": ["float32", [None, NUM_LABELS]]}
  for key, probs in expected.items():
    for kind in ("uint8", "float32"):
      np.testing.assert_allclose(result[f"{key}_{kind}"], probs, atol=1e-5,
                                 err_msg=f"{key} {kind}")


def test_serving_json_tells_a_server_the_label_order(served):
  model_dir, out = served
  info = model_store.read_info(model_dir)
  with open(os.path.join(out, "serving.json")) as f:
    meta = json.load(f)
  assert meta["format"] == serving.FORMAT and meta["labels"] == info["labels"]
  assert meta["image_size"] == SIZE and meta["transform"] == info["transform"]
  assert meta["mean"] == info["transform"]["mean"] and meta["std"] == info["transform"]["std"]
  assert meta["jax_version"] == jax.__version__ and meta["platforms"] == ["cpu", "cuda"]
  assert {k: v["file"] for k, v in meta["jax_export"].items()} == serving.JAX_FILES
  assert meta["saved_model"]["path"] == "saved_model/1"
  assert sorted(meta["saved_model"]["signatures"]) == ["serving_default", "serving_normalized"]
  assert len(meta["thresholds"]) == NUM_LABELS
  assert sorted(os.listdir(out)) == sorted([*serving.JAX_FILES.values(), "saved_model",
                                            "serving.json"])


def test_clear_errors_for_a_model_without_labels_and_an_existing_out(served, tmp_path, capsys):
  model_dir, out = served
  converted = tmp_path / "converted"  # as ctran_jax.convert writes it: no labels, no transform
  shutil.copytree(model_dir, converted)
  info = model_store.read_info(model_dir)
  (converted / "model.json").write_text(json.dumps({**info, "labels": None, "transform": None}))
  new_out = str(tmp_path / "new")
  assert serving.main(["--model", str(converted), "--out", new_out]) == 2
  err = capsys.readouterr().err
  assert "no label names or eval transform" in err and "export_model" in err
  assert "Traceback" not in err and not os.path.exists(new_out)
  assert serving.main(["--model", model_dir, "--out", out]) == 2
  assert "already exists; choose a new --out" in capsys.readouterr().err
  assert serving.main(["--model", model_dir, "--out", new_out, "--platforms", "gpu"]) == 2
  assert "expected some of cpu, cuda" in capsys.readouterr().err
  assert not os.path.exists(new_out)


def test_jax_only_export(served, tmp_path):
  model_dir, _ = served
  out = str(tmp_path / "jax_only")
  assert serving.main(["--model", model_dir, "--out", out, "--no_saved_model",
                       "--platforms", "cpu"]) == 0
  assert sorted(os.listdir(out)) == sorted([*serving.JAX_FILES.values(), "serving.json"])
  with open(os.path.join(out, "serving.json")) as f:
    meta = json.load(f)
  assert meta["saved_model"] is None and meta["platforms"] == ["cpu"]
