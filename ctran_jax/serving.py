r"""Export a trained C-Tran for serving: `jax.export` artefacts and a TensorFlow SavedModel.

    python -m ctran_jax.serving --model=/tmp/ctran_demo_model --out=/tmp/ctran_demo_serving
    python -m ctran_jax.serving --model=DIR --out=OUT --platforms=cpu

From a model directory (`ctran_jax.export_model`, with label names and eval transform) it
writes a new directory ``OUT``::

  OUT/probabilities_uint8.jax     jax.export, images uint8 (b, S, S, 3), normalised inside
  OUT/probabilities_float32.jax   jax.export, images float32 (b, S, S, 3), already normalised
  OUT/saved_model/1/              TF SavedModel (jax2tf): signatures serving_default (uint8)
                                  and serving_normalized (float32); "1" is the version
                                  folder TF Serving expects under --model_base_path
  OUT/serving.json                written last: label order, input size, mean/std, the
                                  eval transform, thresholds, signatures, versions

Every function takes ``(images, label_states)`` and returns the probabilities
``sigmoid(logits)``, float32 (b, L). ``label_states`` is int32 (b, L): -1 unknown, 0 known
absent, 1 known present (other values are clipped into [-1, 1]); the batch size ``b`` is
symbolic (any b >= 1). S is the model's input size: a server decodes the image and applies
the eval transform's geometry (``serving.json`` "transform": "ctran" resizes to
``scale_size`` and centre-crops ``image_size``; "cub" centre-crops ``image_size``,
zero-padding smaller images), then sends uint8 pixels; the uint8 functions compute
``(x / 255 - mean) / std`` themselves. The float32 functions take images normalised that
way already (e.g. by `ctran_jax.data.pipeline.eval_image`, which also resizes in float and
so reproduces evaluation exactly).

The weights are inside the artefacts: constants of each ``.jax`` file, variables of the
SavedModel (one copy shared by both signatures). Both are lowered for ``--platforms``
(default cpu and cuda), so one artefact runs on either.

Loading, with jax only::

  exported = jax.export.deserialize(bytearray(open("OUT/probabilities_uint8.jax", "rb").read()))
  probabilities = exported.call(images_uint8, label_states_int32)

with TensorFlow only::

  serve = tf.saved_model.load("OUT/saved_model/1").signatures["serving_default"]
  probabilities = serve(images=images_uint8, label_states=states)["probabilities"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FORMAT = "ctran_jax/serving/v1"
INFO_FILE = "serving.json"
JAX_FILES = {"uint8": "probabilities_uint8.jax", "float32": "probabilities_float32.jax"}
SAVED_MODEL = os.path.join("saved_model", "1")
SIGNATURES = {"serving_default": "uint8", "serving_normalized": "float32"}
PLATFORMS = ("cpu", "cuda")


# ----------------------------------------------------------------------------- functions

def check_info(info: dict) -> None:
  """ValueError unless the model directory's info has what a server needs."""
  if info.get("labels") is None or info.get("transform") is None:
    raise ValueError("this model directory has no label names or eval transform (a "
                     "converted torch model?); export one from a training run with "
                     "`python -m ctran_jax.export_model --workdir W --out DIR`")
  if info["config"].get("kind") != "ctran":
    raise ValueError(f"a {info['config'].get('kind')!r} model; serving exports C-Tran models")
  if len(info["labels"]) != info["config"]["num_labels"]:
    raise ValueError(f"model.json lists {len(info['labels'])} labels for a model with "
                     f"{info['config']['num_labels']}")


def normaliser(transform: dict):
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``, the eval pipeline's formula."""
  import jax.numpy as jnp

  mean = np.asarray(transform["mean"], np.float32)
  std = np.asarray(transform["std"], np.float32)
  scale, shift = 1.0 / (255.0 * std), -mean / std  # float32, as the data pipeline computes

  def normalise(images):
    return images.astype(jnp.float32) * scale + shift

  return normalise


def probability_function(model, transform: dict, *, uint8: bool):
  """``(weights, images, label_states) -> probabilities`` and the model's `weights` (a flat
  list of host arrays: Params and BatchStats), pure: the model is rebuilt inside, in eval
  mode, from its description (dropout RNG state, which eval does not use, is made there)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ctran_jax import model_store

  model_def = model_store.ModelDef.build(model_store.model_config(model))
  state = (nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
  leaves, treedef = jax.tree.flatten(state)
  normalise = normaliser(transform) if uint8 else None

  def probabilities(weights, images, label_states):
    params, batch_stats = jax.tree.unflatten(treedef, weights)
    net = model_def.merge(params, batch_stats)
    net.eval()
    if normalise is not None:
      images = normalise(images)
    states = jnp.clip(label_states.astype(jnp.int32), -1, 1)
    return jax.nn.sigmoid(net(images.astype(jnp.float32), states)).astype(jnp.float32)

  return probabilities, [np.asarray(x) for x in leaves]


def weight_names(model) -> list[str]:
  """Names of the `probability_function` weights, in order (for SavedModel variables)."""
  import jax
  from flax import nnx

  state = (nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
  paths = jax.tree_util.tree_flatten_with_path(state)[0]
  names = []
  for path, _ in paths:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    parts = parts[1:]  # drop the (params, batch_stats) index
    names.append("/".join(parts[:-1] if parts[-1] == "value" else parts))
  return names


def input_specs(info: dict, *, uint8: bool, batch=None):
  """(images, label_states) ShapeDtypeStructs; `batch` None = a symbolic dimension "b"."""
  import jax
  import jax.numpy as jnp

  if batch is None:
    (batch,) = jax.export.symbolic_shape("b")
  size, num_labels = info["transform"]["image_size"], len(info["labels"])
  return (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8 if uint8 else jnp.float32),
          jax.ShapeDtypeStruct((batch, num_labels), jnp.int32))


# ----------------------------------------------------------------------------- artefacts

def export_jax(model, info: dict, *, uint8: bool, platforms=PLATFORMS):
  """The `jax.export.Exported` of ``(images, label_states) -> probabilities``, weights as
  constants, batch dimension symbolic."""
  import jax

  fn, weights = probability_function(model, info["transform"], uint8=uint8)

  def serve(images, label_states):
    return fn(weights, images, label_states)

  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      *input_specs(info, uint8=uint8))


def save_saved_model(model, info: dict, path: str, *, platforms=PLATFORMS) -> None:
  """A TF SavedModel at `path` (jax2tf): `SIGNATURES`, weights as variables."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  size, num_labels = info["transform"]["image_size"], len(info["labels"])
  polymorphic = [None, f"(b, {size}, {size}, 3)", f"(b, {num_labels})"]
  module = tf.Module()
  functions = {}
  for signature, kind in SIGNATURES.items():
    fn, weights = probability_function(model, info["transform"], uint8=kind == "uint8")
    if not functions:  # one set of variables, shared by the signatures
      module.weights = [tf.Variable(w, trainable=False, name=name)
                        for w, name in zip(weights, weight_names(model), strict=True)]
    converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic, with_gradient=False,
                               native_serialization_platforms=tuple(platforms))
    functions[signature] = _signature(module, converted, size, num_labels,
                                      tf.uint8 if kind == "uint8" else tf.float32)
    setattr(module, signature, functions[signature])
  tf.saved_model.save(module, path, signatures=functions)


def _signature(module, converted, size: int, num_labels: int, image_dtype):
  import tensorflow as tf

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((None, size, size, 3), image_dtype, name="images"),
      tf.TensorSpec((None, num_labels), tf.int32, name="label_states")])
  def serve(images, label_states):
    return {"probabilities": converted(module.weights, images, label_states)}

  return serve


def signature_info(info: dict) -> dict:
  """The SavedModel signatures' inputs and outputs, as ``saved_model_cli show`` lists them."""
  size, num_labels = info["transform"]["image_size"], len(info["labels"])
  return {name: {"inputs": {"images": {"dtype": kind, "shape": [-1, size, size, 3]},
                            "label_states": {"dtype": "int32", "shape": [-1, num_labels]}},
                 "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, num_labels]}}}
          for name, kind in SIGNATURES.items()}


def export(model_dir: str, out: str, *, platforms=PLATFORMS, saved_model: bool = True) -> dict:
  """Write the serving artefacts of `model_dir` into the new directory `out`; returns the
  written ``serving.json``."""
  import jax

  from ctran_jax import model_store

  info = model_store.read_info(model_dir)
  check_info(info)
  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
  if unknown or not platforms:
    raise ValueError(f"--platforms={','.join(platforms)}; expected some of cpu, cuda, rocm, "
                     "tpu")
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"{out} already exists; choose a new --out")
  model = model_store.load_model(model_dir)
  os.makedirs(out, exist_ok=True)
  for kind, name in JAX_FILES.items():
    exported = export_jax(model, info, uint8=kind == "uint8", platforms=platforms)
    with open(os.path.join(out, name), "wb") as f:
      f.write(exported.serialize())
  tf_version = None
  if saved_model:
    import tensorflow as tf

    save_saved_model(model, info, os.path.join(out, SAVED_MODEL), platforms=platforms)
    tf_version = tf.__version__
  path = os.path.join(model_dir, "thresholds.json")
  fitted = None
  if os.path.exists(path):
    from ctran_jax import thresholds

    fitted = [float(t) for t in thresholds.load(path)["thresholds"]]
  transform = info["transform"]
  meta = {
      "format": FORMAT,
      "labels": list(info["labels"]),
      "image_size": transform["image_size"],
      "mean": list(transform["mean"]), "std": list(transform["std"]),
      "transform": transform,
      "label_states": {"unknown": -1, "absent": 0, "present": 1},
      "thresholds": fitted,
      "jax_export": {kind: {"file": name, "images_dtype": kind,
                            "inputs": ["images", "label_states"], "output": "probabilities"}
                     for kind, name in JAX_FILES.items()},
      "saved_model": ({"path": SAVED_MODEL, "signatures": signature_info(info)}
                      if saved_model else None),
      "platforms": list(platforms),
      "jax_version": jax.__version__, "tensorflow_version": tf_version,
      "model": {"directory": os.path.abspath(model_dir), "config": info["config"],
                "source": info.get("source")},
  }
  tmp = os.path.join(out, INFO_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(out, INFO_FILE))  # written last: marks completeness
  return meta


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ctran_jax.serving",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="a model directory (from ctran_jax.export_model)")
  parser.add_argument("--out", required=True, help="the serving directory to write (new)")
  parser.add_argument("--platforms", default=",".join(PLATFORMS),
                      help="comma-separated platforms to lower for (cpu, cuda, rocm, tpu); "
                      "default cpu,cuda")
  parser.add_argument("--no_saved_model", action="store_true",
                      help="write only the jax.export artefacts (no TensorFlow needed)")
  args = parser.parse_args(argv)
  from ctran_jax import console

  console.quiet_tool()
  try:
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    meta = export(args.model, args.out, platforms=platforms,
                  saved_model=not args.no_saved_model)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = os.path.abspath(args.out)
  written = list(JAX_FILES.values()) + ([SAVED_MODEL] if meta["saved_model"] else [])
  print(f"wrote {out}: {', '.join(written)}, {INFO_FILE}; {len(meta['labels'])} labels, "
        f"input {meta['image_size']}x{meta['image_size']}x3, platforms "
        f"{','.join(meta['platforms'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
