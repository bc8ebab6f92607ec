"""Model directories: float32 weights (orbax) + ``model.json`` (format and constructor config).

``python -m ctran_jax.convert`` writes them; training, evaluation and prediction restore
them with `load_model`. ``model.json`` is written last, so a directory that has it is
complete.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ctran_jax.models.ctran import CTran
from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.resnet import ResNet

WEIGHTS = (nnx.Param, nnx.BatchStat)  # what checkpoints hold; RNG state is not weights


def materialize(abstract_model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Give the non-weight leaves of an ``nnx.eval_shape`` model (RNG keys/counts) real values.

  Building through ``eval_shape`` avoids initialising ~100M parameters eagerly just to
  overwrite them (tens of seconds for a ResNet-101 on 2 CPU cores).
  """
  graphdef, state = nnx.split(abstract_model)
  base = jax.random.key(seed)
  counter = iter(range(1 << 30))

  def fill(leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(base, next(counter))
    # Host zeros, then one transfer: ``jnp.zeros`` would compile a fill per distinct shape
    # (seconds for the ~300 shapes of an Inception-v3 on 2 CPU cores).
    return jax.device_put(np.zeros(leaf.shape, leaf.dtype))

  return nnx.merge(graphdef, jax.tree.map(fill, state))


MODEL_FORMAT = "ctran_jax/model/v1"


def model_config(model: nnx.Module) -> dict:
  """The constructor arguments that rebuild `model` (stored beside saved weights)."""
  if isinstance(model, ResNet):
    return {"kind": "resnet", "depth": model.depth, "width": model.width,
            "stage_sizes": list(model.stage_sizes), "block": model.block}
  if isinstance(model, InceptionV3):
    return {"kind": "inception_v3", "aux_logits": model.aux_logits,
            "num_classes": model.num_classes}
  if isinstance(model, CTran):
    bb, layer = model.backbone, model.encoder[0]
    config = {"kind": "ctran", "num_labels": model.num_labels, "hidden": model.hidden,
              "heads": layer.heads, "layers": len(model.encoder),
              "ffn_dim": layer.linear1.out_features, "dropout": layer.dropout1.rate,
              "use_lmt": model.use_lmt, "train_unknown_state": model.train_unknown_state,
              "pos_emb": model.pos_emb,
              "image_tokens": model.image_tokens, "backbone": model.backbone_kind}
    if model.backbone_kind == "resnet":  # an old model.json without "backbone" means this
      config.update({"backbone_depth": bb.depth, "backbone_width": bb.width,
                     "backbone_stage_sizes": list(bb.stage_sizes), "backbone_block": bb.block})
    return config
  raise TypeError(f"cannot describe a {type(model).__name__}")


# kind -> (class, name of the config entry passed positionally, if any)
_KINDS = {"resnet": (ResNet, "depth"), "inception_v3": (InceptionV3, None),
          "ctran": (CTran, "num_labels")}


def _constructor(config: dict, seed: int):
  """A zero-argument function that builds the model `config` describes."""
  config = dict(config)
  kind = config.pop("kind")
  if kind not in _KINDS:
    raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_KINDS)}")
  cls, positional = _KINDS[kind]
  args = (config.pop(positional),) if positional else ()
  return lambda: cls(*args, **config, rngs=nnx.Rngs(seed))


def build_model(config: dict, *, seed: int = 0, **overrides):
  """Rebuild a model from `model_config` output (+ overrides such as dtype or bn_mode)."""
  make = _constructor({**config, **overrides}, seed)
  return materialize(nnx.eval_shape(make), seed)


def save_model(model: nnx.Module, directory: str) -> str:
  """Write weights (orbax) + ``model.json`` (format, constructor config) to `directory`."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, "model.json")):
    raise FileExistsError(f"{directory} already holds a converted model; choose another --out")
  os.makedirs(directory, exist_ok=True)
  weights = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "weights"), weights)
    ckptr.wait_until_finished()
  meta = {"format": MODEL_FORMAT, "config": model_config(model)}
  tmp = os.path.join(directory, "model.json.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(directory, "model.json"))  # written last: marks completeness
  return directory


def load_model(directory: str, **overrides) -> nnx.Module:
  """Restore a model written by `save_model` (eval mode). Overrides: dtype, bn_mode, ..."""
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "model.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory} is not a converted model (no model.json); "
                            "create one with `python -m ctran_jax.convert SRC --out DIR`")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != MODEL_FORMAT:
    raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r}")
  config = meta["config"]
  for key in ("stage_sizes", "backbone_stage_sizes"):
    if config.get(key) is not None:
      config[key] = tuple(config[key])
  model = build_model(config, **overrides)
  target = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(directory, "weights"), abstract)
  state = nnx.state(model, WEIGHTS)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  model.eval()
  return model


def init_model(config: dict, *, seed: int = 0, **overrides) -> nnx.Module:
  """A freshly initialised model from a `model_config`-style dict, built by one compiled call.

  Eager NNX construction runs every initialiser op by op (tens of seconds for a ResNet-101
  on 2 CPU cores); compiling the constructor once is much faster.
  """
  abstract = build_model(config, seed=seed, **overrides)
  graphdef, _ = nnx.split(abstract)
  make = _constructor({**config, **overrides}, seed)
  state = jax.jit(lambda: nnx.state(make()))()
  return nnx.merge(graphdef, state)
