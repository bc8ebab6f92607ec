"""Import PyTorch state dicts: torchvision ResNets / Inception-v3 and reference C-Tran checkpoints.

The torch name of every NNX variable is derived from the module tree (module type decides
the leaf names and the layout transform), so the same code serves a stand-alone ResNet,
a C-Tran backbone and a full C-Tran.  Every key and shape is checked before anything is
written into the model; all problems are reported in one error.

CLI::

  python -m ctran_jax.convert ctran_coco.pth --out converted/ctran_coco
  python -m ctran_jax.convert resnet101-63fe2227.pth --out converted/r101 --backbone-only
  python -m ctran_jax.convert inception_v3_google-0cc3c7bd.pth --out converted/inception_v3

The kind of file is recognised from its keys (``label_lt.weight``: a reference C-Tran,
``conv1.weight``: a ResNet, ``Conv2d_1a_3x3.conv.weight``: an Inception-v3).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ctran_jax.model_store import WEIGHTS, materialize, save_model
from ctran_jax.models.ctran import CTran, LabelwiseLinear
from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.resnet import RESNET_SPECS, BatchNorm, ResNet

REFERENCE_BACKBONE_PREFIX = "backbone.base_network."
INCEPTION_FIRST_KEY = "Conv2d_1a_3x3.conv.weight"  # marks a torchvision-layout Inception-v3
# Keys that torch checkpoints carry but the JAX model has no use for.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|(^|\.)fc\.(weight|bias)$")

# NNX module name (dotted path) -> reference C-Tran module name.
_REFERENCE_RENAMES = [
    (re.compile(r"^backbone(?=\.|$)"), "backbone.base_network"),
    (re.compile(r"^encoder\.(\d+)\.(in_proj|out_proj)$"),
     r"self_attn_layers.\1.transformer_layer.self_attn.\2"),
    (re.compile(r"^encoder\.(\d+)\.(linear1|linear2|norm1|norm2)$"),
     r"self_attn_layers.\1.transformer_layer.\2"),
    (re.compile(r"^label_embedding$"), "label_lt"),
    (re.compile(r"^state_embedding$"), "known_label_lt"),
    (re.compile(r"^input_norm$"), "LayerNorm"),
    (re.compile(r"^head$"), "output_linear"),
]


class StateDictMismatchError(ValueError):
  """A state dict does not fit the model: lists every missing, unexpected and misshaped key."""

  def __init__(self, what: str, missing=(), unexpected=(), wrong_shape=()):
    self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), list(
        wrong_shape)
    lines = [f"state dict does not match {what}:"]
    if self.wrong_shape:
      lines.append(f"  {len(self.wrong_shape)} key(s) with the wrong shape:")
      lines += [f"    {k}: checkpoint {got}, model expects {want}"
                for k, got, want in self.wrong_shape]
    if self.missing:
      lines.append(f"  {len(self.missing)} missing key(s): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  {len(self.unexpected)} unexpected key(s): " + ", ".join(self.unexpected))
    super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------
# Name and layout map
# ---------------------------------------------------------------------------------------

def _conv_to_flax(w):
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _conv_to_torch(w):
  return np.transpose(w, (3, 2, 0, 1))  # HWIO -> OIHW


def _same(x):
  return x


def _leaf_map(module) -> list[tuple[str, str, Callable, Callable]]:
  """(nnx attribute, torch leaf, torch->flax transform, flax->torch transform)."""
  ident = (_same, _same)
  if isinstance(module, nnx.Conv):
    return [("kernel", "weight", _conv_to_flax, _conv_to_torch)] + (
        [("bias", "bias", *ident)] if module.bias is not None else [])
  if isinstance(module, nnx.Linear):
    return [("kernel", "weight", np.transpose, np.transpose), ("bias", "bias", *ident)]
  if isinstance(module, BatchNorm):
    return [("scale", "weight", *ident), ("bias", "bias", *ident),
            ("mean", "running_mean", *ident), ("var", "running_var", *ident)]
  if isinstance(module, nnx.LayerNorm):
    return [("scale", "weight", *ident), ("bias", "bias", *ident)]
  if isinstance(module, nnx.Embed):
    return [("embedding", "weight", *ident)]
  if isinstance(module, LabelwiseLinear):
    return [("kernel", "weight", *ident), ("bias", "bias", *ident)]
  return []


def torch_layout(model: nnx.Module, *, reference: bool | None = None) -> dict[str, tuple]:
  """torch name -> (NNX path, torch shape, torch->flax, flax->torch) for every weight of `model`.

  `reference=True` names a C-Tran as the reference repo does (``backbone.base_network.``,
  ``self_attn_layers.N.transformer_layer.`` ...); a ResNet is named as torchvision does.
  """
  if reference is None:
    reference = isinstance(model, CTran)
  layout = {}
  for path, module in nnx.iter_modules(model):
    leaves = _leaf_map(module)
    if not leaves:
      continue
    name = _torch_name(path, reference)
    for attr, torch_leaf, to_flax, to_torch in leaves:
      shape = getattr(module, attr).shape
      key = f"{name}.{torch_leaf}" if name else torch_leaf
      key = re.sub(r"in_proj\.(weight|bias)$", r"in_proj_\1", key)  # torch MHA packs q,k,v
      torch_shape = to_torch(np.empty(shape, np.bool_)).shape  # a view: nothing is filled
      layout[key] = (path + (attr,), torch_shape, to_flax, to_torch)
  return layout


def _torch_name(path: tuple, reference: bool) -> str:
  name = ".".join(str(p) for p in path)
  if reference:
    for pattern, repl in _REFERENCE_RENAMES:
      name = pattern.sub(repl, name)
  return name


def skipped_prefixes(model: nnx.Module, *, reference: bool | None = None) -> tuple[str, ...]:
  """Key prefixes a checkpoint may carry for parts `model` does not have (they are skipped).

  An Inception-v3 built without ``AuxLogits`` skips that head (the reference C-Tran CUB
  model has one but its loss weight is 0); a reference CUB checkpoint also carries an
  unused ``type_lt`` embedding. ``fc`` heads are skipped for every model (``_IGNORED``).
  """
  if reference is None:
    reference = isinstance(model, CTran)
  skipped = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, InceptionV3) and module.AuxLogits is None:
      name = _torch_name(path, reference)
      skipped.append(f"{name}.AuxLogits." if name else "AuxLogits.")
  if reference and isinstance(model, CTran) and model.backbone_kind == "inception_v3":
    skipped.append("type_lt.")
  return tuple(skipped)


def export_state_dict(model: nnx.Module, *, reference: bool | None = None) -> dict[str, np.ndarray]:
  """The torch-layout state dict of `model` (inverse of `load_state_dict`).

  Only what the model holds: no ``num_batches_tracked``, no ResNet ``fc``, no heads an
  InceptionV3 was built without.
  """
  weights = dict(nnx.to_flat_state(nnx.state(model, WEIGHTS)))
  return {key: np.ascontiguousarray(to_torch(np.asarray(weights[path][...])))
          for key, (path, _, _, to_torch) in torch_layout(model, reference=reference).items()}


def check_state_dict(state_dict: Mapping[str, Any], layout: Mapping[str, tuple],
                     what: str, skip: tuple[str, ...] = ()) -> None:
  """Raise StateDictMismatchError naming every missing, unexpected or misshaped key.

  Keys the model has are always checked; otherwise ``_IGNORED`` keys (torch counters,
  ``fc`` heads) and keys under a `skip` prefix are left out.
  """
  present = {k for k in state_dict
             if k in layout or not (_IGNORED.search(k) or k.startswith(skip))}
  missing = sorted(set(layout) - present)
  unexpected = sorted(present - set(layout))
  wrong = [(k, tuple(np.shape(state_dict[k])), layout[k][1])
           for k in layout if k in present and tuple(np.shape(state_dict[k])) != layout[k][1]]
  if missing or unexpected or wrong:
    raise StateDictMismatchError(what, missing, unexpected, wrong)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                    reference: bool | None = None, prefix: str = "") -> nnx.Module:
  """Copy a torch state dict into `model` in place (all keys checked first); returns it.

  `prefix` selects a sub-tree of the state dict, e.g. ``"backbone.base_network."`` to take
  a reference checkpoint's backbone for a ResNet.
  """
  state_dict = sub_state_dict(state_dict, prefix)
  layout = torch_layout(model, reference=reference)
  check_state_dict(state_dict, layout, f"{type(model).__name__} ({_describe(model)})",
                   skipped_prefixes(model, reference=reference))
  updates = {}
  for key, (path, _, to_flax, _) in layout.items():
    # A contiguous host copy, then a plain transfer: ``jnp.asarray`` of a transposed view
    # compiles a copy per distinct shape (seconds for an Inception-v3 on 2 CPU cores).
    updates[path] = jax.device_put(np.ascontiguousarray(
        to_flax(np.asarray(state_dict[key], np.float32))))
  state = nnx.state(model, WEIGHTS)
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(updates[path])
  nnx.update(model, state)
  return model


def sub_state_dict(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The entries under `prefix`, with the prefix removed (all entries for prefix "")."""
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _describe(model) -> str:
  if isinstance(model, CTran):
    text = f"num_labels={model.num_labels}, hidden={model.hidden}, layers={len(model.encoder)}"
    return text + (", backbone=inception_v3" if model.backbone_kind == "inception_v3" else "")
  if isinstance(model, InceptionV3):
    return f"aux_logits={model.aux_logits}, num_classes={model.num_classes}"
  if isinstance(model, ResNet):
    return f"block={model.block}, stage_sizes={model.stage_sizes}, width={model.width}"
  return ""


# ---------------------------------------------------------------------------------------
# Building models from state dicts
# ---------------------------------------------------------------------------------------

def resnet_options_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """Infer depth/block/stage sizes/width of a torchvision-layout ResNet from its keys."""
  if f"{prefix}conv1.weight" not in state_dict:
    where = f" (keys under {prefix!r})" if prefix else ""
    raise StateDictMismatchError(f"a torchvision-layout ResNet{where}",
                                 missing=[f"{prefix}conv1.weight"])
  stage_sizes = []
  for stage in range(1, 5):
    blocks = {int(m.group(1)) for k in state_dict
              if (m := re.match(re.escape(f"{prefix}layer{stage}.") + r"(\d+)\.", k))}
    stage_sizes.append(len(blocks))
  block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in state_dict else "basic"
  width = int(np.shape(state_dict[f"{prefix}conv1.weight"])[0])
  depth = next((d for d, s in RESNET_SPECS.items()
                if s.block == block and s.stage_sizes == tuple(stage_sizes)), None)
  if depth is not None:
    return {"backbone_depth": depth, "backbone_width": width}
  return {"backbone_depth": 0, "backbone_width": width,
          "backbone_stage_sizes": tuple(stage_sizes), "backbone_block": block}


def reference_options_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Infer num_labels, hidden, layers, ffn width and backbone of a reference C-Tran."""
  if "label_lt.weight" not in state_dict:
    raise StateDictMismatchError("a reference C-Tran checkpoint", missing=["label_lt.weight"])
  num_labels, hidden = (int(d) for d in np.shape(state_dict["label_lt.weight"]))
  layers = len({int(m.group(1)) for k in state_dict
                if (m := re.match(r"self_attn_layers\.(\d+)\.", k))})
  ffn_key = "self_attn_layers.0.transformer_layer.linear1.weight"
  options = {"num_labels": num_labels, "hidden": hidden, "layers": layers}
  if ffn_key in state_dict:
    options["ffn_dim"] = int(np.shape(state_dict[ffn_key])[0])
  if REFERENCE_BACKBONE_PREFIX + INCEPTION_FIRST_KEY in state_dict:  # the CUB model
    options["backbone"] = "inception_v3"
  else:
    options.update(resnet_options_from_state_dict(state_dict, REFERENCE_BACKBONE_PREFIX))
  return options


def inception_options_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """``aux_logits``/``num_classes`` of a torchvision-layout Inception-v3 (0 = head absent)."""
  if INCEPTION_FIRST_KEY not in state_dict:
    raise StateDictMismatchError("a torchvision-layout Inception-v3",
                                 missing=[INCEPTION_FIRST_KEY])
  def classes(key):
    return int(np.shape(state_dict[key])[0]) if key in state_dict else 0
  return {"aux_logits": classes("AuxLogits.fc.weight"), "num_classes": classes("fc.weight")}


def _resnet_kwargs(options: dict) -> dict:
  return {"width": options["backbone_width"],
          "stage_sizes": options.get("backbone_stage_sizes"),
          "block": options.get("backbone_block")}


def from_reference(state_dict: Mapping[str, Any], *, heads: int = 4, seed: int = 0,
                   **options) -> CTran:
  """A CTran holding a reference C-Tran state dict (sizes inferred from its shapes).

  `heads` cannot be read from the weights (4 in the reference). Other keyword options
  (dropout, use_lmt, pos_emb, image_tokens, bn_mode, dtype, ...) go to ``CTran``.
  The model is returned in eval mode.
  """
  state_dict = _as_numpy(state_dict)
  config = {**reference_options_from_state_dict(state_dict), "heads": heads, **options}
  num_labels = config.pop("num_labels")
  model = materialize(nnx.eval_shape(lambda: CTran(num_labels, **config, rngs=nnx.Rngs(seed))),
                       seed)
  load_state_dict(model, state_dict, reference=True)
  model.eval()
  return model


def resnet_from_torchvision(state_dict: Mapping[str, Any], *, seed: int = 0,
                            **options) -> ResNet:
  """A ResNet holding a torchvision ResNet state dict (``fc`` is ignored); eval mode."""
  state_dict = _as_numpy(state_dict)
  inferred = resnet_options_from_state_dict(state_dict)
  model = materialize(nnx.eval_shape(lambda: ResNet(
      inferred["backbone_depth"], **_resnet_kwargs(inferred), **options,
      rngs=nnx.Rngs(seed))), seed)
  load_state_dict(model, state_dict)
  model.eval()
  return model


def inception_from_torchvision(state_dict: Mapping[str, Any], *, heads: bool = True,
                               seed: int = 0, **options) -> InceptionV3:
  """An InceptionV3 holding a torchvision ``inception_v3`` state dict; eval mode.

  With `heads` the ``AuxLogits`` and ``fc`` heads are kept when the file has them (sizes
  from their shapes); without, both are dropped, which is what C-Tran's backbone needs.
  Other keyword options (bn_mode, dtype) go to ``InceptionV3``.
  """
  state_dict = _as_numpy(state_dict)
  inferred = inception_options_from_state_dict(state_dict)
  if not heads:
    inferred = {"aux_logits": 0, "num_classes": 0}
  model = materialize(nnx.eval_shape(lambda: InceptionV3(
      **{**inferred, **options}, rngs=nnx.Rngs(seed))), seed)
  load_state_dict(model, state_dict)
  model.eval()
  return model


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------

def _as_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu().numpy()
    out[k] = np.asarray(v)
  return out


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  """Accept a bare state dict or a training checkpoint wrapping one; drop ``module.``."""
  for key in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{source}: no state dict found (expected a mapping name -> tensor)")
  if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Read a state dict from .pth/.pt (needs torch), .npz or .safetensors as numpy arrays.

  torch files are opened with ``weights_only=True``; a training checkpoint that also
  pickled other objects (e.g. numpy scalars for metrics) needs ``trust_pickle=True``,
  which runs its pickle code: only for files from a trusted source.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError:
      raise ImportError(
          f"reading {path} needs PyTorch: `pip install torch`, or convert it to .npz or "
          ".safetensors on a machine that has torch, e.g. `np.savez(out, **{k: v.numpy() "
          "for k, v in torch.load(path).items()})`") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError here
      if trust_pickle or "Unsupported global" not in str(e):
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"{path}: not a readable torch checkpoint ({detail})") from e
      raise ValueError(
          f"{path}: holds pickled objects besides tensors, which torch will not load with "
          "weights_only=True. If you trust the file, pass --trust-pickle "
          "(read_state_dict(..., trust_pickle=True))") from e
  elif ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      obj = {k: f[k] for k in f.files}
  elif ext == ".safetensors":
    from safetensors.numpy import load_file
    obj = load_file(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint format {ext!r}; "
                     "use .pth/.pt (torch), .npz or .safetensors")
  return _as_numpy(_unwrap(obj, path))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def convert_file(src: str, out: str, *, backbone_only: bool = False, heads: int = 4,
                 trust_pickle: bool = False, keep_heads: bool = False) -> nnx.Module:
  """Read `src`, build the matching model, save it to `out`; returns the model.

  `keep_heads` keeps an Inception-v3's ``fc``/``AuxLogits`` (dropped by default: C-Tran
  uses neither, and a headless model is what initialises its backbone).
  """
  state_dict = read_state_dict(src, trust_pickle=trust_pickle)
  if "label_lt.weight" in state_dict and not backbone_only:
    model = from_reference(state_dict, heads=heads)
  else:
    if any(f"{REFERENCE_BACKBONE_PREFIX}{k}" in state_dict
           for k in ("conv1.weight", INCEPTION_FIRST_KEY)):  # a C-Tran's backbone
      state_dict = sub_state_dict(state_dict, REFERENCE_BACKBONE_PREFIX)
    if INCEPTION_FIRST_KEY in state_dict:
      model = inception_from_torchvision(state_dict, heads=keep_heads)
    elif "conv1.weight" in state_dict:
      model = resnet_from_torchvision(state_dict)
    else:
      raise ValueError(
          f"{src}: neither a reference C-Tran checkpoint (no 'label_lt.weight') nor a "
          f"torchvision ResNet (no 'conv1.weight') or Inception-v3 (no "
          f"'{INCEPTION_FIRST_KEY}'); its first keys: {sorted(state_dict)[:5]}")
  save_model(model, out)
  return model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ctran_jax.convert",
      description="Convert a PyTorch checkpoint (torchvision ResNet or Inception-v3, or a "
                  "reference C-Tran) to a ctran_jax model directory (orbax weights + "
                  "model.json). The kind of checkpoint is recognised from its keys.")
  parser.add_argument("src", help=".pth/.pt (needs torch), .npz or .safetensors state dict")
  parser.add_argument("--out", required=True, help="output directory (must not hold a model)")
  parser.add_argument("--backbone-only", action="store_true",
                      help="keep only the backbone (a torchvision file, or a C-Tran's backbone)")
  parser.add_argument("--keep-heads", action="store_true",
                      help="keep an Inception-v3's fc and AuxLogits heads (dropped by default: "
                           "C-Tran uses neither)")
  parser.add_argument("--heads", type=int, default=4,
                      help="attention heads of a C-Tran checkpoint (not stored in it; default 4)")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="allow a .pth that pickles more than tensors (runs its pickle code)")
  args = parser.parse_args(argv)
  try:
    model = convert_file(args.src, args.out, backbone_only=args.backbone_only, heads=args.heads,
                         trust_pickle=args.trust_pickle, keep_heads=args.keep_heads)
  except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"wrote {type(model).__name__} ({_describe(model)}, {n:,} parameters) to "
        f"{os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
