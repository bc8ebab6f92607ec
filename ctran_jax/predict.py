r"""Predict the labels of your own images with a trained C-Tran, telling it some labels.

    python -m ctran_jax.predict --model=/tmp/ctran_demo_model photo.jpg more/ 'shots/*.png'
    python -m ctran_jax.predict --model=DIR photo.jpg --known=disc=1 --known=grid=0
    python -m ctran_jax.predict --workdir=/tmp/ctran_demo photos/ --json
    python -m ctran_jax.predict --model=DIR photos/ --attention=/tmp/maps --top=3

A model directory comes from `ctran_jax.export_model` (``--workdir`` reads a training
checkpoint directly); it holds the label names and the eval transform, so images are
transformed exactly as evaluation did. Images: JPEG, PNG, BMP, GIF (first frame), WebP;
grayscale and RGBA are converted to RGB and the EXIF orientation is applied.

Known labels (``--known NAME=1|0``) enter the model as C-Tran's known states and change
the other labels' probabilities; they are shown as given, not predicted. A label is
predicted present when its probability reaches the threshold: ``calibrated`` (the
per-class thresholds in ``thresholds.json``, the default when the model has them), 0.5,
or any number.

``--json`` writes one JSON record per image (one per line)::

  {"image": "photo.jpg", "threshold": "calibrated" | 0.5,
   "known": {"disc": 1, "grid": 0},
   "labels": [{"label": "bands", "probability": 0.93, "predicted": true,
               "threshold": 0.41, "known": false}, ... every label, in label order]}

(a known label has ``"known": true``, its given value as ``probability`` (1.0 / 0.0) and
as ``predicted``). ``--attention DIR`` writes ``DIR/<image>.png`` (the image as the model
saw it, and one panel per top-K predicted and known label: the label token's attention
to the image tokens in the last encoder layer, averaged over heads, upsampled and
overlaid) and ``DIR/<image>.npy`` (those maps for every label, (L, h, w)).

A missing or unreadable image is reported on its own line and the others are still
predicted; the exit status is then 1. Bad arguments (an unknown label name, a value
other than 0/1, a model directory of another version) stop at once with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import io
import json
import os
import sys

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FORMAT = "ctran_jax/prediction/v1"


# ----------------------------------------------------------------------------- the model

class Predictor:
  """A trained model with its label names, eval transform and thresholds, ready to predict.

  One compiled function per batch shape: batches are padded to ``batch_size``.
  """

  def __init__(self, model, info: dict, thresholds=None, *, batch_size: int = 8):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if info.get("labels") is None or info.get("transform") is None:
      raise ValueError("this model directory has no label names or eval transform (a "
                       "converted torch model?); export one from a training run with "
                       "`python -m ctran_jax.export_model --workdir W --out DIR`")
    if batch_size < 1:
      raise ValueError(f"--batch_size={batch_size}; expected a positive integer")
    self.info, self.labels = info, tuple(info["labels"])
    self.transform, self.batch_size = info["transform"], batch_size
    self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
    model.eval()
    graphdef, weights = nnx.split(model)

    def forward(weights, images, states):
      logits, attention = nnx.merge(graphdef, weights)(images, states, return_attention=True)
      return jax.nn.sigmoid(logits), attention[-1]  # last layer, head-averaged

    self._forward = jax.jit(forward)
    self._weights = weights
    self._jnp = jnp

  @classmethod
  def from_directory(cls, directory: str, **kwargs) -> Predictor:
    from ctran_jax import model_store, thresholds

    info = model_store.read_info(directory)
    path = os.path.join(directory, "thresholds.json")
    fitted = thresholds.load(path)["thresholds"] if os.path.exists(path) else None
    return cls(model_store.load_model(directory), info, fitted, **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str, which: str = "latest", **kwargs) -> Predictor:
    from ctran_jax import export_model

    model, info, fitted = export_model.checkpoint_model(workdir, which)
    return cls(model, info, fitted and fitted["thresholds"], **kwargs)

  # --- inputs

  def label_states(self, known: dict[str, int]) -> np.ndarray:
    """(L,) states: -1 unknown, else the given 0 / 1; names checked with a suggestion."""
    states = np.full(len(self.labels), -1, np.int32)
    for name, value in known.items():
      if name not in self.labels:
        close = difflib.get_close_matches(name, self.labels, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown label {name!r}{hint} (the model's {len(self.labels)} "
                         f"labels: {', '.join(self.labels[:20])}"
                         f"{', ...' if len(self.labels) > 20 else ''})")
      if value not in (0, 1):
        raise ValueError(f"label {name!r} given as {value!r}; expected 0 (absent) or 1 "
                         "(present)")
      states[self.labels.index(name)] = value
    return states

  def model_input(self, image: np.ndarray) -> np.ndarray:
    """A decoded uint8 RGB image -> the normalised (S, S, 3) model input (eval transform)."""
    from ctran_jax.data import pipeline

    return np.asarray(pipeline.eval_image(image, self.transform), np.float32)

  # --- the model

  def predict(self, inputs: np.ndarray, states: np.ndarray):
    """(B, S, S, 3) model inputs, (B, L) states -> probabilities (B, L) and attention maps
    (B, L, h, w) of every label token over the image tokens (rows renormalised)."""
    n = len(inputs)
    probs, maps = [], []
    for start in range(0, n, self.batch_size):
      images = inputs[start:start + self.batch_size]
      st = states[start:start + self.batch_size]
      pad = self.batch_size - len(images)
      if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        st = np.concatenate([st, np.full((pad, st.shape[1]), -1, st.dtype)])
      p, attention = self._forward(self._weights, images, st)
      probs.append(np.asarray(p)[:len(images) - pad])
      maps.append(self._label_maps(np.asarray(attention))[:len(images) - pad])
    return np.concatenate(probs), np.concatenate(maps)

  def _label_maps(self, attention: np.ndarray) -> np.ndarray:
    num_labels = len(self.labels)
    tokens = attention.shape[-1] - num_labels
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
      raise ValueError(f"{tokens} image tokens are not a square feature map")
    rows = attention[:, tokens:, :tokens]  # label queries x image keys
    rows = rows / np.maximum(rows.sum(-1, keepdims=True), 1e-12)
    return rows.reshape(len(attention), num_labels, side, side)

  def decide(self, probs: np.ndarray, threshold) -> tuple[np.ndarray, object]:
    """(per-label thresholds (L,), the name of the rule) for ``--threshold``."""
    if threshold in (None, "calibrated"):
      if self.thresholds is not None:
        return self.thresholds, "calibrated"
      if threshold == "calibrated":
        raise ValueError("--threshold=calibrated: this model has no thresholds.json (fitted "
                         "by the final evaluation; export the final or --mode=eval'd "
                         "checkpoint), use --threshold=0.5")
      threshold = 0.5
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"--threshold={threshold}; expected 'calibrated' or a number in [0, 1]")
    return np.full(probs.shape[-1], value, np.float32), value


# ----------------------------------------------------------------------------- images

def expand_inputs(patterns: list[str]) -> list[str]:
  """Files, folders (their image files, sorted) and glob patterns -> paths, in order.

  A path that does not exist is kept, so that it is reported like an unreadable image.
  """
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      paths += sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    elif any(c in pattern for c in "*?[") and glob.glob(pattern):
      paths += sorted(glob.glob(pattern))
    else:
      paths.append(pattern)
  return paths


def read_image(path: str) -> np.ndarray:
  """The image as uint8 RGB (H, W, 3), EXIF orientation applied; ValueError if unreadable."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ValueError("no such file") from None
  except OSError as e:
    raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
  return decode_image(data)


def decode_image(data: bytes) -> np.ndarray:
  """The encoded image `data` as uint8 RGB (H, W, 3), EXIF orientation applied; ValueError
  if it is not a readable image (or a decompression bomb: over twice PIL's pixel limit)."""
  from PIL import Image, ImageOps, UnidentifiedImageError

  try:
    with Image.open(io.BytesIO(data)) as image:
      image = ImageOps.exif_transpose(image)
      return np.asarray(image.convert("RGB"), np.uint8)
  except UnidentifiedImageError:
    raise ValueError("not a readable image (not a format PIL recognises)") from None
  except (Image.DecompressionBombError, OSError, SyntaxError) as e:
    raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- output

def record(path: str, probs: np.ndarray, states: np.ndarray, thresholds: np.ndarray, rule,
           labels) -> dict:
  """The JSON record of one image (schema in the module docstring)."""
  entries = []
  for i, name in enumerate(labels):
    if states[i] >= 0:
      entries.append({"label": name, "probability": float(states[i]),
                      "predicted": bool(states[i]), "threshold": None, "known": True})
    else:
      entries.append({"label": name, "probability": float(probs[i]),
                      "predicted": bool(probs[i] >= thresholds[i]),
                      "threshold": float(thresholds[i]), "known": False})
  return {"image": path, "threshold": rule,
          "known": {labels[i]: int(states[i]) for i in np.flatnonzero(states >= 0)},
          "labels": entries}


def table(rec: dict, top: int) -> str:
  """The console table of one record: known labels as given, then the top-K by probability."""
  lines = [rec["image"], f"  {'label':<24} {'probability':>11}  predicted"]
  for e in rec["labels"]:
    if e["known"]:
      lines.append(f"  {e['label']:<24} {'given':>11}  {'yes' if e['predicted'] else 'no'}")
  unknown = sorted((e for e in rec["labels"] if not e["known"]),
                   key=lambda e: -e["probability"])
  for e in unknown[:top] if top > 0 else unknown:
    lines.append(f"  {e['label']:<24} {e['probability']:>11.3f}  "
                 f"{'YES' if e['predicted'] else 'no'}")
  if 0 < top < len(unknown):
    lines.append(f"  ({len(unknown) - top} more below; --top=0 shows all)")
  return "\n".join(lines)


def attention_figure(path: str, model_input: np.ndarray, maps: np.ndarray, rec: dict,
                     transform: dict, top: int) -> None:
  """PNG: the image as the model saw it, then one overlay panel per shown label."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  image = np.clip(model_input * np.asarray(transform["std"]) + np.asarray(transform["mean"]),
                  0, 1)
  known = [i for i, e in enumerate(rec["labels"]) if e["known"]]
  unknown = sorted((i for i, e in enumerate(rec["labels"]) if not e["known"]),
                   key=lambda i: -rec["labels"][i]["probability"])
  shown = unknown[:max(top, 1)] + known
  columns = min(4, len(shown) + 1)
  rows = -(-(len(shown) + 1) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  axes.flat[0].imshow(image)
  axes.flat[0].set_title(os.path.basename(rec["image"]), fontsize=9)
  size = image.shape[0]
  for ax, i in zip(axes.flat[1:], shown, strict=False):
    e = rec["labels"][i]
    heat = _upsample(maps[i], size)
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=heat.max() or 1)
    ax.set_title(f"{e['label']}: given {'yes' if e['predicted'] else 'no'}" if e["known"]
                 else f"{e['label']}: p={e['probability']:.2f}", fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of an (h, w) map to (size, size), cell centres aligned."""
  h, w = grid.shape
  ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
  xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
  bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


# ----------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ctran_jax.predict",
                              description=__doc__.split("\n\n")[0],
                              epilog="The module docstring (README: 'Use a trained model') "
                              "describes the JSON records and the attention maps.")
  p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
  p.add_argument("--model", help="a model directory (from ctran_jax.export_model)")
  p.add_argument("--workdir", help="or a training workdir (with --checkpoint)")
  p.add_argument("--checkpoint", default="latest",
                 help="with --workdir: latest (default), best or a checkpoint step directory")
  p.add_argument("--known", action="append", default=[], metavar="NAME=1|0",
                 help="a label given as present (1) or absent (0); repeat for several")
  p.add_argument("--top", type=int, default=10,
                 help="labels shown per image (and attention panels), by probability; 0: all")
  p.add_argument("--threshold", default=None, help="calibrated, 0.5 or a number in [0, 1] "
                 "(default: calibrated when the model has thresholds, else 0.5)")
  p.add_argument("--json", action="store_true", help="one JSON record per image on stdout")
  p.add_argument("--batch_size", type=int, default=8, help="images per model call")
  p.add_argument("--attention", metavar="DIR", help="write attention-map PNGs and .npy here")
  return p


def parse_known(values: list[str]) -> dict[str, int]:
  known = {}
  for item in values:
    name, sep, value = item.rpartition("=")
    if not sep or not name:
      raise ValueError(f"--known={item!r}; expected NAME=1 or NAME=0")
    if value.strip() not in ("0", "1"):
      raise ValueError(f"--known={item!r}: the value must be 1 (present) or 0 (absent)")
    known[name.strip()] = int(value)
  return known


def run(patterns: list[str], predictor: Predictor, *, known: dict[str, int], top: int,
        threshold, as_json: bool, attention_dir: str | None, out=sys.stdout,
        err=sys.stderr) -> int:
  """Predict every image; returns the exit status (1 when an image could not be read)."""
  states = predictor.label_states(known)
  paths = expand_inputs(patterns)
  if not paths:
    raise ValueError("no images given")
  good, inputs, failed = [], [], 0
  for path in paths:
    try:
      inputs.append(predictor.model_input(read_image(path)))
      good.append(path)
    except ValueError as e:
      print(f"error: {path}: {e}", file=err)
      failed += 1
  if inputs:
    batch = np.stack(inputs)
    probs, maps = predictor.predict(batch, np.tile(states, (len(batch), 1)))
    if attention_dir:
      os.makedirs(attention_dir, exist_ok=True)
    for i, path in enumerate(good):
      per_label, rule = predictor.decide(probs[i], threshold)
      rec = record(path, probs[i], states, per_label, rule, predictor.labels)
      print(json.dumps(rec) if as_json else table(rec, top) + "\n", file=out, flush=True)
      if attention_dir:
        stem = os.path.join(attention_dir, _unique_stem(path, good))
        np.save(stem + ".npy", maps[i])
        attention_figure(stem + ".png", batch[i], maps[i], rec, predictor.transform, top)
  return 1 if failed else 0


def _unique_stem(path: str, paths: list[str]) -> str:
  """The file name without extension; with its folder when two inputs share a name."""
  stem = os.path.splitext(os.path.basename(path))[0]
  if sum(os.path.splitext(os.path.basename(p))[0] == stem for p in paths) > 1:
    stem = os.path.splitext(path)[0].strip(os.sep).replace(os.sep, "_")
  return stem


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from ctran_jax import console

  console.quiet_tool()
  try:
    if bool(args.model) == bool(args.workdir):
      raise ValueError("give --model=DIR (from export_model) or --workdir=W, not both")
    if args.top < 0:
      raise ValueError(f"--top={args.top}; expected 0 (all) or a positive number")
    known = parse_known(args.known)
    if args.threshold not in (None, "calibrated"):
      try:
        float(args.threshold)
      except ValueError:
        raise ValueError(f"--threshold={args.threshold}; expected 'calibrated' or a "
                         "number in [0, 1]") from None
    predictor = (Predictor.from_directory(args.model, batch_size=args.batch_size)
                 if args.model else
                 Predictor.from_workdir(args.workdir, args.checkpoint,
                                        batch_size=args.batch_size))
    return run(args.images, predictor, known=known, top=args.top, threshold=args.threshold,
               as_json=args.json, attention_dir=args.attention)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
