"""Model descriptions, and model directories that store a description with its weights.

A *description* is the JSON dict that rebuilds a model (``{"kind": "ctran", ...}``); it is
the one description of a model in the project: `describe_ctran` makes it from
``config.model``, `model_config` reads it off a built model (the two agree, a test pins it),
`constructor` builds from it, and checkpoints and model directories store it. Settings that
change how a model computes but not its weights (``RUNTIME``: BatchNorm mode, compute dtype,
rematerialisation) are never stored.

Model directories (``python -m ctran_jax.convert`` writes them): float32 weights (orbax) +
``model.json`` (format and description), written last, so a directory that has it is
complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ctran_jax.models.ctran import CTran
from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.remat import set_remat
from ctran_jax.models.resnet import RESNET_SPECS, ResNet

WEIGHTS = (nnx.Param, nnx.BatchStat)  # what checkpoints hold; RNG state is not weights
DTYPES = ("float32", "bfloat16")
MODEL_FORMAT = "ctran_jax/model/v2"


# ----------------------------------------------------------------------------- descriptions

def describe_ctran(model_config, num_labels: int) -> dict:
  """The description of the C-Tran that ``config.model`` configures for `num_labels` labels."""
  m = model_config
  description = {"kind": "ctran", "num_labels": num_labels, "hidden": m.hidden,
                 "heads": m.heads, "layers": m.layers, "ffn_dim": m.ffn_dim or m.hidden,
                 "dropout": m.dropout, "use_lmt": m.use_lmt,
                 "train_unknown_state": m.train_unknown_state, "pos_emb": m.pos_emb,
                 "image_tokens": m.image_tokens, "backbone": m.backbone}
  if m.backbone == "resnet":
    spec = RESNET_SPECS.get(m.backbone_depth)
    description.update(
        backbone_depth=m.backbone_depth, backbone_width=m.backbone_width,
        backbone_stage_sizes=list(spec.stage_sizes if spec else m.backbone_stage_sizes),
        backbone_block=spec.block if spec else m.backbone_block)
  return description


def model_config(model: nnx.Module) -> dict:
  """The description of a built model (what `constructor` needs to build it again)."""
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
              "pos_emb": model.pos_emb, "image_tokens": model.image_tokens,
              "backbone": model.backbone_kind}
    if model.backbone_kind == "resnet":
      config.update({"backbone_depth": bb.depth, "backbone_width": bb.width,
                     "backbone_stage_sizes": list(bb.stage_sizes), "backbone_block": bb.block})
    return config
  raise TypeError(f"cannot describe a {type(model).__name__}")


# kind -> (class, name of the description entry passed positionally, if any)
_KINDS = {"resnet": (ResNet, "depth"), "inception_v3": (InceptionV3, None),
          "ctran": (CTran, "num_labels")}


def constructor(description: dict, *, seed: int = 0, bn_mode: str = "train",
                dtype: str = "float32", remat: str = "none") -> Callable[[], nnx.Module]:
  """A zero-argument function that builds the described model (the ``RUNTIME`` settings
  applied); call it under `nnx.eval_shape` or `jax.jit` rather than eagerly."""
  config = dict(description)
  kind = config.pop("kind", None)
  if kind not in _KINDS:
    raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_KINDS)}")
  if jnp.dtype(dtype).name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  cls, positional = _KINDS[kind]
  args = (config.pop(positional),) if positional else ()
  for key in ("stage_sizes", "backbone_stage_sizes"):
    if config.get(key) is not None:
      config[key] = tuple(config[key])

  def make():
    model = cls(*args, **config, bn_mode=bn_mode, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    return set_remat(model, remat) if remat != "none" else model

  return make


# ------------------------------------------------------------------------- binding the state

@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Everything about a model but its weights: what jitted functions rebuild it from.

  ``make`` builds it (call under `jax.jit` / `nnx.eval_shape`); ``graphdef`` is its static
  structure; ``rng_shapes`` its RNG streams (dropout), abstract: they are in no saved state,
  `merge` makes them anew from a key.
  """
  description: dict
  make: Callable[[], nnx.Module]
  graphdef: nnx.GraphDef
  rng_shapes: nnx.State

  @classmethod
  def build(cls, description: dict, *, seed: int = 0, **runtime) -> ModelDef:
    """The definition of the described model (`constructor`'s checks run here)."""
    make = constructor(description, seed=seed, **runtime)
    graphdef, _, _, rngs = nnx.split(nnx.eval_shape(make), nnx.Param, nnx.BatchStat, ...)
    return cls(description, make, graphdef, rngs)

  def merge(self, params, batch_stats, dropout_key: jax.Array | None = None) -> nnx.Module:
    """The model holding `params` and `batch_stats`, every RNG stream reseeded from
    `dropout_key` (`nnx.reseed`: each stream draws its own key); evaluation needs none."""
    rngs = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else jnp.zeros(x.shape, x.dtype), self.rng_shapes)
    model = nnx.merge(self.graphdef, params, batch_stats, rngs)
    if dropout_key is not None:
      tags = {v.tag for _, v in nnx.to_flat_state(self.rng_shapes) if isinstance(v, nnx.RngKey)}
      nnx.reseed(model, **{tag: jax.random.fold_in(dropout_key, i)
                           for i, tag in enumerate(sorted(tags))})
    return model


def materialize(abstract_model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Give every leaf of an ``nnx.eval_shape`` model a value: zeros, RNG keys from `seed`.

  For models whose weights are overwritten next (a converted or loaded model): building
  through ``eval_shape`` avoids running ~100M parameter initialisers eagerly.
  """
  graphdef, state = nnx.split(abstract_model)
  base = jax.random.key(seed)
  counter = iter(range(1 << 30))

  def fill(leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(base, next(counter))
    # Host zeros, then one transfer: ``jnp.zeros`` would compile a fill per distinct shape.
    return jax.device_put(np.zeros(leaf.shape, leaf.dtype))

  return nnx.merge(graphdef, jax.tree.map(fill, state))


# ------------------------------------------------------------------------ model directories

def save_model(model: nnx.Module, directory: str, *, labels=None, transform: dict | None = None,
               source: dict | None = None) -> str:
  """Write weights (orbax) + ``model.json`` to `directory`.

  ``model.json``: ``{"format", "config": description, "labels": [L names] | null,
  "transform": eval transform | null, "source": where it came from | null}``. A model
  exported from training has labels and transform, so prediction needs no training config
  (`ctran_jax.predict`); a converted torch model has neither unless given.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, "model.json")):
    raise FileExistsError(f"{directory} already holds a model; choose another --out")
  os.makedirs(directory, exist_ok=True)
  weights = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "weights"), weights)
    ckptr.wait_until_finished()
  meta = {"format": MODEL_FORMAT, "config": model_config(model),
          "labels": list(labels) if labels is not None else None, "transform": transform,
          "source": source}
  tmp = os.path.join(directory, "model.json.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(directory, "model.json"))  # written last: marks completeness
  return directory


def read_info(directory: str) -> dict:
  """``DIR/model.json`` (format checked); clear errors for a missing or older directory."""
  meta_path = os.path.join(os.path.abspath(directory), "model.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory} is not a model directory (no model.json); create "
                            "one with `python -m ctran_jax.export_model --workdir W --out DIR` "
                            "or `python -m ctran_jax.convert SRC --out DIR`")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != MODEL_FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this version reads "
                     f"{MODEL_FORMAT!r}; export or convert the model again")
  return meta


def read_description(directory: str) -> dict:
  """The model description in ``DIR/model.json``."""
  return read_info(directory)["config"]


def load_weights(directory: str, description: dict | None = None) -> dict:
  """The stored weights as a pure dict of host arrays (as ``nnx.to_pure_dict`` gives)."""
  description = description or read_description(directory)
  abstract = nnx.eval_shape(constructor(description))
  target = nnx.to_pure_dict(nnx.state(abstract, WEIGHTS))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(directory), "weights"),
                         jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target))


def load_model(directory: str, **runtime) -> nnx.Module:
  """Restore a model written by `save_model` (eval mode); `runtime`: bn_mode, dtype, remat."""
  description = read_description(directory)
  model = materialize(nnx.eval_shape(constructor(description, **runtime)))
  state = nnx.state(model, WEIGHTS)
  nnx.replace_by_pure_dict(state, load_weights(directory, description))
  nnx.update(model, state)
  model.eval()
  return model
