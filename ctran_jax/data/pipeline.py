"""tf.data input pipelines over TFDS: reproducible, resumable training batches and padded eval.

The trainer needs three things from its input: batches that are a pure function of
``(seed, step)`` so a resumed run sees exactly the batches it would have seen; eval batches
that cover a split exactly once with every process stepping in lockstep; and enough
throughput that a tiny model on two CPU cores never waits.  Hence:

* every random choice is a stateless op keyed on ``(seed, process, epoch, position)``;
  each epoch is shuffled with its own seed, so ``start_step`` only replays (without
  decoding or augmenting) the part of one epoch before it;
* eval batches carry a ``valid`` mask: the last batch is padded, and a process whose shard
  is shorter pads with whole invalid batches, so all yield ``num_eval_batches`` batches;
* ``example_id`` hashes the TFDS record id, so it names an example whatever the batch
  size, shuffle or process count.

Any TFDS builder with an ``image`` feature and a multi-hot ``labels`` (L,) tensor works;
``info.metadata["label_names"]`` is used when present.  Builtin TFDS datasets with other
features (``coco/2014``, ``voc/2007``) are read through an adapter (`adapters`).  ``name``
may also be the directory of a prepared TFDS dataset (``.../ctran_folder/mine/1.0.0``,
``gs://...``), read with ``tfds.builder_from_directory``.  Builders that declare
``GENERATED = True`` (``ctran_demo``) are built on first use.  A builder may provide
``label_visible`` (L,) bool (CUB: concepts marked "not visible" in the image), which eval
batches carry for extra-label evaluation; its metadata ``num_concepts``,
``concept_groups`` and ``group_names`` describe CUB-style concept groups.

Data config fields: the ``data`` section of configs/default.py lists them, with their
defaults.  ``data.transform`` names an entry of `TRANSFORMS`: "ctran" (the reference's
COCO/VOC/VG transforms: train: a square of a size drawn from ``crop_sizes`` at a random
position of the image resized to ``scale_size``, resized to ``image_size``, flipped;
eval: resize to ``scale_size``, centre crop ``image_size``) or "cub" (the reference's CUB
transforms: train colour jitter -> random-resized crop to ``image_size`` -> flip; eval
centre crop of ``image_size`` without resizing, zero padding smaller images). Both train
transforms end with optional RandAugment and Cutout (``data.randaugment_n``,
``data.cutout``; off by default and in the reference; `randaugment`), keyed per example.
``data.resize_on_device`` needs a transform with a device path ("ctran"): train batches
then carry the decoded crop (uint8, in a ``canvas_size`` square) + its size + flip, eval
batches the window of the image that the centre crop samples (uint8, in such a square) +
the image's size + the window's origin, and the train and eval steps resize, mirror and
normalise on the accelerator (`ctran_jax.augment`), so the host only decodes.
Prediction (`eval_image`) keeps the host eval transform, which the eval step reproduces.
A ``shuffle_buffer`` at least the split's size gives a full permutation per epoch;
``cache`` keeps decoded images in memory (small datasets only).

Undecodable examples (image bytes that TF cannot decode, in a dataset prepared elsewhere or
damaged since): ``data.on_bad_example="fail"`` (default) stops at the first with a one-line
ValueError naming the split and dataset; ``"skip"`` drops them, deterministically, and
counts them in a per-row ``skipped`` field of every batch (train: how many examples were
dropped just before this one; eval: True on a row that stands for a dropped example, which
is also ``valid=False``), summed by the returned iterator's ``skipped`` attribute.  See
`train_dataset` and `eval_dataset` for how dropping keeps resume exactness and lockstep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import re
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ctran_jax.data import (
  adapters,
  demo,  # noqa: F401  (registers ctran_demo with TFDS)
  randaugment,
)

try:  # TF only feeds the host; the accelerators belong to JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU support
  pass

_ID_BUCKETS = 2**62
_AUTOTUNE = tf.data.AUTOTUNE
ON_BAD_EXAMPLE = ("fail", "skip")
# on_bad_example="skip": an epoch reads its shuffled shard up to this many times over to fill
# its batches with decodable examples (more than once only when more examples fail than the
# epoch leaves out anyway: the shard's size modulo the batch size).
_CYCLES = 2


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the trainer needs to know about a dataset before reading it.

  num_concepts / concept_groups / group_names: CUB-style datasets whose first
  ``num_concepts`` labels are concepts in groups (0 / () elsewhere).
  """
  name: str
  num_labels: int
  label_names: tuple[str, ...]
  split_sizes: dict[str, int]
  num_concepts: int = 0
  concept_groups: tuple[int, ...] = ()
  group_names: tuple[str, ...] = ()
  has_label_visible: bool = False


# ----------------------------------------------------------------------------- builders


def ctran_datasets() -> list[str]:
  """Names of the TFDS builders this package registers."""
  return sorted(n for n in tfds.list_builders(with_community_datasets=False)
                if n.startswith("ctran_"))


def _is_directory_name(name: str) -> bool:
  return "://" in name or name.startswith((os.sep, ".")) or os.path.isdir(name)


@functools.lru_cache(maxsize=16)
def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if _is_directory_name(name):
    if not tf.io.gfile.exists(os.path.join(name, "dataset_info.json")):
      raise FileNotFoundError(f"data.name={name!r} looks like a directory but holds no "
                              "prepared TFDS dataset (no dataset_info.json); give the "
                              "version directory, e.g. <data_dir>/ctran_folder/<config>/1.0.0")
    return tfds.builder_from_directory(name)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {name!r}; registered ctran datasets: "
                     f"{ctran_datasets()} (any TFDS builder with 'image' and multi-hot "
                     f"'labels' features works once its module is imported)") from e


def _prepare(builder, adapter, data_config) -> None:
  """Check the features and put the data on disk: generated datasets are built here."""
  name, data_dir = data_config.name, data_config.data_dir
  features = builder.info.features
  needed = ("image",) if adapter else ("image", "labels")
  for key in needed:
    if key not in features:
      raise ValueError(f"dataset {name!r} has no {key!r} feature (has {sorted(features)}); "
                       "the pipeline needs 'image' and multi-hot 'labels' (L,) (or an "
                       f"adapter: registered for {adapters.registered()})")
  if not builder.is_prepared():
    if getattr(builder, "GENERATED", False):
      # The builder shows its own progress; TFDS's "Downloading and preparing" lines
      # (stdout) and its per-split bars would only confuse: nothing is downloaded.
      tfds.display_progress_bar(False)
      try:
        with contextlib.redirect_stdout(io.StringIO()):
          builder.download_and_prepare()
      finally:
        tfds.display_progress_bar(True)
    elif data_config.prepare:
      builder.download_and_prepare()
    else:
      raise FileNotFoundError(
          f"dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it once with\n"
          f"  python -m ctran_jax.data.prepare {name} --manual_dir=<folder with the original "
          f"files> --data_dir={data_dir or '~/tensorflow_datasets'}\n"
          "(`python -m ctran_jax.data.prepare --help` lists the datasets and the files each "
          "needs; data.prepare=True builds on first use instead).")


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A dataset resolved once (builder with its data on disk, adapter, meta) for one data
  config: the trainer and the evaluator share it instead of resolving the name again."""
  config: ml_collections.ConfigDict
  builder: tfds.core.DatasetBuilder
  adapter: adapters.Adapter | None
  meta: DatasetMeta
  # Eval tf.data pipelines by (split, batch size, process): repeated evaluations reuse
  # one in-memory cache of decoded images.
  eval_cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def open_source(data_config) -> DataSource:
  """Resolve ``data_config``: check the transform, prepare a generated dataset, read meta.

  In a multi-process job on a shared filesystem, let one process open it first.
  """
  check_transform(data_config)
  on_bad_example(data_config)
  builder = _builder(data_config.name, data_config.data_dir)
  adapter = adapters.adapter_for(builder)
  _prepare(builder, adapter, data_config)
  info = builder.info
  metadata = dict(info.metadata or {})
  if adapter:
    num_labels, names = adapter.num_labels, adapter.label_names
  else:
    num_labels = int(info.features["labels"].shape[0])
    names = tuple(metadata.get("label_names", ()))
  if len(names) != num_labels:
    names = tuple(f"label_{i}" for i in range(num_labels))
  split_sizes = {k: int(v.num_examples) for k, v in info.splits.items()}
  for split in (data_config.train_split, data_config.eval_split, data_config.test_split):
    if split and split not in split_sizes:  # expressions: "train+validation", "train[:90%]"
      try:
        split_sizes[split] = int(info.splits[split].num_examples)
      except (KeyError, ValueError) as e:
        raise ValueError(f"dataset {data_config.name!r} has no split {split!r} (splits: "
                         f"{sorted(info.splits)}): {e}") from None
  meta = DatasetMeta(name=data_config.name, num_labels=num_labels, label_names=names,
                     split_sizes=split_sizes,
                     num_concepts=int(metadata.get("num_concepts", 0)),
                     concept_groups=tuple(int(g) for g in metadata.get("concept_groups", ())),
                     group_names=tuple(metadata.get("group_names", ())),
                     has_label_visible="label_visible" in info.features)
  return DataSource(config=data_config, builder=builder, adapter=adapter, meta=meta)


# ---------------------------------------------------------------------------- transforms


def _check_ctran(data_config) -> None:
  s, scale = data_config.image_size, data_config.scale_size
  crops = tuple(data_config.crop_sizes)
  if not 0 < s <= scale:
    raise ValueError(f"need 0 < image_size <= scale_size (the eval centre crop), "
                     f"got image_size={s}, scale_size={scale}")
  if not crops or not all(0 < c <= scale for c in crops):
    raise ValueError(f"crop_sizes must be non-empty and in (0, scale_size={scale}], got {crops}")


def _check_cub(data_config) -> None:
  if data_config.image_size <= 0:
    raise ValueError(f"need image_size > 0, got {data_config.image_size}")


def _normalise(image: tf.Tensor, data_config) -> tf.Tensor:
  """(image / 255 - mean) / std as one multiply-add (a hot loop: ~1M values per image)."""
  mean = np.asarray(data_config.mean, np.float32)
  std = np.asarray(data_config.std, np.float32)
  return tf.cast(image, tf.float32) * (1.0 / (255.0 * std)) + (-mean / std)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to (size, size), antialiased when shrinking (as PIL, the reference's)."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] is not None and image.shape[0] == image.shape[1] == size:
    return image
  shrinking = tf.reduce_max(tf.shape(image)[:2]) > size
  # Upsampling is identical either way, and the plain kernel is cheaper.
  return tf.cond(shrinking, lambda: tf.image.resize(image, (size, size), antialias=True),
                 lambda: tf.image.resize(image, (size, size)))


def random_crop(seed, data_config):
  """The reference's train crop, in ``scale_size`` coordinates: (size, top, left, flip).

  A square of a size drawn uniformly from ``crop_sizes`` at a uniform integer position of
  the ``scale_size`` x ``scale_size`` resized image, and a fair coin for the mirror.
  """
  scale = data_config.scale_size
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  sizes = tuple(data_config.crop_sizes)
  crops = tf.constant(sizes, tf.int32)
  crop = crops[tf.random.stateless_uniform([], seeds[0], 0, len(sizes), tf.int32)]
  top = tf.random.stateless_uniform([], seeds[1], 0, scale - crop + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, scale - crop + 1, tf.int32)
  flip = (tf.random.stateless_uniform([], seeds[3]) < 0.5) & data_config.flip
  return crop, top, left, flip


def _crop_window(shape, crop, top, left, scale):
  """The crop of the scaled image as an integer window [y, x, h, w] of the original image."""
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  fy, fx = h / scale, w / scale
  y0 = tf.cast(tf.round(tf.cast(top, tf.float32) * fy), tf.int32)
  x0 = tf.cast(tf.round(tf.cast(left, tf.float32) * fx), tf.int32)
  y1 = tf.cast(tf.round(tf.cast(top + crop, tf.float32) * fy), tf.int32)
  x1 = tf.cast(tf.round(tf.cast(left + crop, tf.float32) * fx), tf.int32)
  y0, x0 = tf.minimum(y0, shape[0] - 1), tf.minimum(x0, shape[1] - 1)
  return tf.stack([y0, x0, tf.maximum(y1 - y0, 1), tf.maximum(x1 - x0, 1)])


def decode_crop(image, seed, data_config):
  """The train crop's pixels (uint8, original resolution) and the flip coin.

  ``image`` is a decoded uint8 image or encoded bytes.  Resizing to ``scale_size`` and then
  cropping equals cropping the matching window of the original image, so the crop window
  is mapped back to original pixels (rounded to whole pixels) and only that window is
  decoded (``decode_and_crop_jpeg`` for JPEG bytes).
  """
  scale = data_config.scale_size
  crop, top, left, flip = random_crop(seed, data_config)
  if image.dtype == tf.string:
    is_jpeg = tf.io.is_jpeg(image)
    shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(image),
                    lambda: tf.shape(tf.io.decode_image(image, channels=3,
                                                        expand_animations=False)))
    window = _crop_window(shape, crop, top, left, scale)

    def decode_window():
      return tf.image.decode_and_crop_jpeg(image, window, channels=3)

    def decode_and_slice():
      full = tf.io.decode_image(image, channels=3, expand_animations=False)
      return tf.slice(full, [window[0], window[1], 0], [window[2], window[3], 3])

    patch = tf.cond(is_jpeg, decode_window, decode_and_slice)
  else:
    window = _crop_window(tf.shape(image), crop, top, left, scale)
    patch = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])
  return patch, flip


def _finish_train_image(pixels, key, data_config) -> tf.Tensor:
  """RandAugment, normalisation, Cutout: the end of every train transform (`randaugment`;
  with both off, the normalised pixels)."""
  pixels = randaugment.augment_pixels(pixels, key, data_config)
  return randaugment.cutout_normalised(_normalise(pixels, data_config), key, data_config)


def ctran_train_image(image, seed, data_config) -> tf.Tensor:
  """The reference's train transform (resize to scale, random crop, resize, flip), fused;
  then RandAugment and Cutout when configured (`randaugment`; off in the reference).

  The crop window is decoded at original resolution (`decode_crop`) and resized once to
  image_size: one bilinear resize of the crop instead of two (reference: PIL resize, crop,
  resize). Shrinking by more than 25 % is antialiased (as PIL always is); milder shrinking
  is not, which is cheaper and changes little.
  """
  size = data_config.image_size
  patch, flip = decode_crop(image, seed, data_config)
  strong_shrink = tf.reduce_max(tf.shape(patch)[:2]) * 4 > size * 5  # resize reads uint8
  patch = tf.cond(strong_shrink,
                  lambda: tf.image.resize(patch, (size, size), antialias=True),
                  lambda: tf.image.resize(patch, (size, size)))
  patch = tf.cond(flip, lambda: tf.reverse(patch, [1]), lambda: patch)
  return _finish_train_image(patch, seed, data_config)


def canvas_size(data_config) -> int:
  return max(data_config.scale_size, data_config.image_size)


def ctran_train_window(image, seed, data_config) -> dict:
  """Host half of the train transform when ``data.resize_on_device``: decode the crop only.

  Returns the crop's pixels in the top-left corner of a zero ``canvas_size`` square (uint8),
  its (height, width) and the flip coin; `ctran_jax.augment.resize_windows` finishes the
  job (bilinear resize to image_size, mirror, normalise) inside the jitted train step,
  where it costs the accelerator next to nothing and the host only decodes. A crop
  larger than the canvas (images larger than scale_size) is first shrunk on the host.
  """
  side = canvas_size(data_config)
  patch, flip = decode_crop(image, seed, data_config)
  hw = tf.shape(patch)[:2]
  fits = tf.reduce_all(hw <= side)
  target = tf.minimum(hw, side)
  patch = tf.cond(fits, lambda: patch, lambda: tf.cast(tf.round(tf.image.resize(
      patch, target, antialias=True)), tf.uint8))
  hw = tf.shape(patch)[:2]
  canvas = tf.pad(patch, [[0, side - hw[0]], [0, side - hw[1]], [0, 0]])
  return {"image": tf.ensure_shape(canvas, (side, side, 3)), "window": hw, "flip": flip}


def _centre_offset(data_config) -> int:
  """Top (= left) of the eval centre crop in the scaled image (torchvision's rounding)."""
  return int(round((data_config.scale_size - data_config.image_size) / 2.0))


def _resized_centre_crop(image, data_config) -> tf.Tensor:
  """Resize to scale_size (float, `_resize`), crop the centre image_size square."""
  size, offset = data_config.image_size, _centre_offset(data_config)
  return _resize(image, data_config.scale_size)[offset:offset + size, offset:offset + size]


def centre_crop(image, data_config) -> tf.Tensor:
  """Eval: resize to scale → centre crop image_size (torchvision's rounding)."""
  return _normalise(_resized_centre_crop(image, data_config), data_config)


def _centre_span(extent, data_config):
  """(first row, row count) of an image side of ``extent`` pixels that the centre crop of
  its bilinear resize to scale_size reads, with one row of margin on either side (so
  that float rounding on the device cannot reach outside it)."""
  ratio = tf.cast(extent, tf.float32) / data_config.scale_size
  offset = _centre_offset(data_config)
  first = (offset + 0.5) * ratio - 0.5
  last = (offset + data_config.image_size - 0.5) * ratio - 0.5
  start = tf.maximum(tf.cast(tf.floor(first), tf.int32) - 1, 0)
  # last's upper neighbour is floor(last) + 1; + 1 margin; + 1: the end is exclusive.
  stop = tf.minimum(tf.cast(tf.floor(last), tf.int32) + 3, extent)
  return start, stop - start


def ctran_eval_window(image, data_config) -> dict:
  """Host half of the eval transform when ``data.resize_on_device``: decode what it reads.

  `centre_crop`'s output pixels sample only a window of the image (about image_size /
  scale_size of each side), so only that window is decoded (``decode_and_crop_jpeg`` for
  JPEG bytes) and shipped, uint8, in the top-left corner of a zero ``canvas_size`` square,
  with ``extent``, the image's (height, width), and ``origin``, the window's top-left in
  it; `ctran_jax.augment.centre_crop_windows` finishes the job inside the jitted eval step
  and equals `centre_crop` to float rounding. An image larger than scale_size (which
  `centre_crop` shrinks with antialiasing) is resized and cropped here as `centre_crop`
  does and rounded to uint8 (a difference of at most half a grey level), shipped as an
  image of extent scale_size whose window is the crop itself.
  """
  scale, side = data_config.scale_size, canvas_size(data_config)
  offset = _centre_offset(data_config)

  def resized_crop(decoded):
    crop = tf.saturate_cast(tf.round(_resized_centre_crop(decoded, data_config)), tf.uint8)
    return crop, tf.constant([scale, scale]), tf.constant([offset, offset])

  def window_of(shape):
    (top, height), (left, width) = (_centre_span(shape[i], data_config) for i in (0, 1))
    return tf.stack([top, left, height, width])

  def from_decoded(decoded):  # every pixel is decoded already: slice the window
    shape = tf.shape(decoded)[:2]

    def sliced():
      box = window_of(shape)
      return tf.slice(decoded, [box[0], box[1], 0], [box[2], box[3], 3]), shape, box[:2]

    return tf.cond(tf.reduce_all(shape <= scale), sliced, lambda: resized_crop(decoded))

  def from_jpeg():  # decode only the window
    shape = tf.image.extract_jpeg_shape(image)[:2]

    def cropped():
      box = window_of(shape)
      return tf.image.decode_and_crop_jpeg(image, box, channels=3), shape, box[:2]

    return tf.cond(tf.reduce_all(shape <= scale), cropped,
                   lambda: resized_crop(tf.io.decode_jpeg(image, channels=3)))

  if image.dtype != tf.string:
    patch, extent, origin = from_decoded(image)
  else:
    patch, extent, origin = tf.cond(
        tf.io.is_jpeg(image), from_jpeg,
        lambda: from_decoded(tf.io.decode_image(image, channels=3, expand_animations=False)))
  hw = tf.shape(patch)[:2]
  canvas = tf.pad(patch, [[0, side - hw[0]], [0, side - hw[1]], [0, 0]])
  return {"image": tf.ensure_shape(canvas, (side, side, 3)), "extent": extent,
          "origin": origin}


def cub_train_image(image, key, data_config) -> tf.Tensor:
  """The reference's CUB train transform: colour jitter -> random-resized crop -> flip;
  then RandAugment and Cutout when configured (`randaugment`; off in the reference).

  Colour jitter: brightness factor ~ U[1 - 32/255, 1 + 32/255], then saturation factor
  ~ U[0.5, 1.5] (torchvision draws the order of the two at random; a fixed order is a
  negligible difference).  Random-resized crop: area 8-100 %, aspect ratio 3/4-4/3, 10
  tries, else the whole image (TF's sampler; torchvision falls back to a centre crop).
  """
  size = data_config.image_size
  keys = tf.random.experimental.stateless_split(key, num=4)
  image = tf.cast(image, tf.float32) / 255.0
  image = image * tf.random.stateless_uniform([], keys[0], 1 - 32 / 255, 1 + 32 / 255)
  image = tf.clip_by_value(image, 0.0, 1.0)
  grey = tf.image.rgb_to_grayscale(image)
  image = tf.clip_by_value(
      grey + tf.random.stateless_uniform([], keys[1], 0.5, 1.5) * (image - grey), 0.0, 1.0)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=keys[2],
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize(image, (size, size), antialias=True)
  if data_config.flip:
    image = tf.where(tf.random.stateless_uniform([], keys[3]) < 0.5,
                     tf.image.flip_left_right(image), image)
  return _finish_train_image(image * 255.0, key, data_config)


def cub_eval_image(image, data_config) -> tf.Tensor:
  """The reference's CUB test transform: centre crop image_size, zero-padded if smaller."""
  size = data_config.image_size
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  pad_h, pad_w = tf.maximum(size - shape[0], 0), tf.maximum(size - shape[1], 0)
  image = tf.pad(image, [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2],
                         [0, 0]])
  shape = tf.shape(image)
  # torchvision: top = int(round((h - size) / 2)), round half to even like tf.round.
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
  image = tf.ensure_shape(image[top:top + size, left:left + size], (size, size, 3))
  # Padding is black *before* normalisation, as torchvision pads the PIL image.
  return _normalise(image, data_config)


@dataclasses.dataclass(frozen=True)
class Transform:
  """One recipe of image transforms, named by ``data.transform`` in `TRANSFORMS`.

  train(image, key, data_config): the normalised float (S, S, 3) train image from a decoded
    uint8 image, or from the encoded bytes unless ``train_decoded``.
  eval(image, data_config): the normalised float (S, S, 3) eval image of a decoded image.
  check(data_config): raises ValueError on sizes the recipe cannot use.
  train_window(image, key, data_config) -> dict: the host half of ``train`` for
    ``data.resize_on_device`` (`ctran_train_window`); None: the recipe has no device path.
  eval_window(image, data_config) -> dict: the host half of ``eval`` for
    ``data.resize_on_device`` (`ctran_eval_window`), from a decoded image or the bytes.
  """
  train: Callable
  eval: Callable
  check: Callable
  train_decoded: bool = False
  train_window: Callable | None = None
  eval_window: Callable | None = None

  @property
  def on_device(self) -> bool:
    """Whether the recipe has a device path (``data.resize_on_device``)."""
    return self.train_window is not None and self.eval_window is not None


# A new recipe is one more entry here.
TRANSFORMS = {
    "ctran": Transform(train=ctran_train_image, eval=centre_crop, check=_check_ctran,
                       train_window=ctran_train_window, eval_window=ctran_eval_window),
    "cub": Transform(train=cub_train_image, eval=cub_eval_image, check=_check_cub,
                     train_decoded=True),
}


def check_transform(data_config) -> None:
  """Raises ValueError on a transform, sizes or statistics that cannot work together."""
  transform = TRANSFORMS.get(data_config.transform)
  if transform is None:
    raise ValueError(f"data.transform={data_config.transform!r}; expected one of "
                     f"{tuple(TRANSFORMS)}")
  if data_config.resize_on_device and not transform.on_device:
    with_device_path = " or ".join(repr(k) for k, t in TRANSFORMS.items() if t.on_device)
    raise ValueError(f"config.data.resize_on_device needs config.data.transform="
                     f"{with_device_path}")
  transform.check(data_config)
  randaugment.check(data_config)
  if len(data_config.mean) != 3 or len(data_config.std) != 3 or min(data_config.std) <= 0:
    raise ValueError(f"mean/std need 3 channels and std > 0, got {data_config.mean}, "
                     f"{data_config.std}")


EVAL_TRANSFORM_KEYS = ("transform", "image_size", "scale_size", "mean", "std")


def eval_transform_spec(data_config) -> dict:
  """The data config's entries that the eval transform reads: stored with a trained model,
  so that prediction transforms images as evaluation did, without the training config."""
  return {k: (list(data_config[k]) if isinstance(data_config[k], tuple) else data_config[k])
          for k in EVAL_TRANSFORM_KEYS}


def eval_image(image, spec: dict) -> tf.Tensor:
  """The eval transform of a decoded uint8 (H, W, 3) image under an `eval_transform_spec`."""
  data_config = ml_collections.ConfigDict(spec)
  return TRANSFORMS[spec["transform"]].eval(image, data_config)


# ------------------------------------------------------------------------- bad examples


def on_bad_example(data_config) -> str:
  """``data.on_bad_example`` ("fail" when absent, as in configs saved before it existed)."""
  policy = data_config.get("on_bad_example", "fail")
  if policy not in ON_BAD_EXAMPLE:
    raise ValueError(f"data.on_bad_example={policy!r}; expected one of {ON_BAD_EXAMPLE}")
  return policy


def _tf_message(error: tf.errors.OpError) -> str:
  """TF's own words of an error raised in a tf.data function, on one line."""
  line = (error.message or str(error)).strip().splitlines()[0]
  line = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:\w+\].*", "", line)
  return re.sub(r"^.*Iterator::[\w:]+:\s*", "", line).strip()[:200]


class Batches(Iterator):
  """Numpy batches of a pipeline (`train_dataset`, `eval_dataset`).

  ``skipped``: how many undecodable examples the batches returned so far stand for (the sum
  of their ``skipped`` field; 0 unless ``data.on_bad_example="skip"``).  With "fail", an
  image that does not decode raises a one-line ValueError instead of TF's error.
  """

  def __init__(self, ds: tf.data.Dataset, data_config, split: str, short_epoch: str = ""):
    self._batches = iter(tfds.as_numpy(ds))
    self._fails = on_bad_example(data_config) == "fail"
    self._where = f"split {split!r} of dataset {data_config.name!r}"
    self._short_epoch = short_epoch
    self.skipped = 0

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._batches)
    except tf.errors.InvalidArgumentError as e:
      if not self._fails:
        raise
      raise ValueError(f"{self._where}: an example's image cannot be decoded "
                       f"({_tf_message(e)}); set config.data.on_bad_example=skip to drop "
                       "such examples, or prepare the dataset again") from None
    except tf.errors.FailedPreconditionError as e:
      if not self._short_epoch or "expected to contain" not in str(e):
        raise
      raise ValueError(f"{self._where}: {self._short_epoch}") from None
    self.skipped += int(np.sum(batch["skipped"]))
    return batch


def _blank(spec) -> dict:
  """Zeros of an element spec (unknown dimensions: 1)."""
  return tf.nest.map_structure(
      lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec)


def _refill(indexed: tf.data.Dataset, count: int, filler) -> tf.data.Dataset:
  """``count`` elements: those of ``indexed`` ((index, element) pairs, indices increasing in
  [0, count)) at their index, and ``filler`` at every index that is missing."""

  def gap(previous, item):
    index, element = item
    return index, (index - previous - 1, element)

  def expand(missing, element):
    return tf.data.Dataset.from_tensors(filler).repeat(missing).concatenate(
        tf.data.Dataset.from_tensors(element))

  ds = indexed.scan(tf.constant(-1, tf.int64), gap).flat_map(expand)
  return ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat()).take(count)


# ------------------------------------------------------------------------------ reading


def _read(source: DataSource, split) -> tf.data.Dataset:
  """Records in file order as {example_id, image (decoded when cached, else bytes), labels}.

  Cached with ``on_bad_example="skip"``: every record also has ``ok``; one whose image does
  not decode keeps its place as a blank (``ok=False``, ``example_id=-1``, zeros), so the
  cached records line up with the files as the uncached ones do.
  """
  builder, adapter = source.builder, source.adapter
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  has_visible = "label_visible" in builder.info.features

  def select(ex):
    out = adapter.to_example(ex) if adapter else ex
    example = {"example_id": tf.strings.to_hash_bucket_fast(ex["tfds_id"], _ID_BUCKETS),
               "image": out["image"], "labels": tf.cast(out["labels"], tf.int32)}
    if has_visible:
      example["label_visible"] = tf.cast(ex["label_visible"], tf.bool)
    return example

  ds = ds.map(select)
  if source.config.cache:
    if on_bad_example(source.config) == "skip":
      ds = ds.enumerate().map(
          lambda i, ex: (i, {**ex, "image": _decoded(builder, ex["image"]),
                             "ok": tf.constant(True)}),
          num_parallel_calls=_AUTOTUNE).ignore_errors()
      blank = {**_blank(ds.element_spec[1]), "example_id": tf.constant(-1, tf.int64)}
      ds = _refill(ds, builder.info.splits[split].num_examples, blank)
    else:
      ds = ds.map(lambda ex: {**ex, "image": _decoded(builder, ex["image"])},
                  num_parallel_calls=_AUTOTUNE)
    ds = ds.cache()
  return ds


def _decoded(builder, image: tf.Tensor) -> tf.Tensor:
  """A record's image decoded (by the dataset's own image feature), if it is still bytes."""
  if image.dtype == tf.string:
    return builder.info.features["image"].decode_example(image)
  return image


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def _local_split(split, process_index, process_count, drop_remainder=False):
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                     f"{process_count}")
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count, drop_remainder=drop_remainder)


# -------------------------------------------------------------------------------- train


def train_dataset(source: DataSource, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Batches:
  """Endless per-process training batches {image, labels, example_id, skipped}, from
  ``start_step``.

  An epoch is this process's shard shuffled with a seed from (seed, process, epoch), cut to
  whole batches; augmentation is keyed on (that epoch seed, position in epoch).  So batch
  k is the same whatever ``start_step`` was, and resuming costs one pass of the undecoded
  records of the current epoch up to ``start_step`` (plus filling the shuffle buffer).
  (``Dataset.shuffle`` also mixes in TF's global seed; nothing here sets it.)

  ``on_bad_example="skip"``: an epoch is the first ``steps_per_epoch * batch_size``
  examples of that shuffled shard (read twice over if needed, `_CYCLES`) whose transform
  succeeds, each still keyed on its position; ``skipped`` (B,) int32 counts the examples
  dropped just before each row in its epoch's order.  Which examples fail depends only on
  (seed, epoch, position), so batches (their ``skipped`` included) stay a function of the
  step; the price is that resuming also decodes and transforms the current epoch's first
  ``start_step`` batches (uncached; cached datasets know their bad records without that).
  Without bad examples the batches equal those of "fail".
  """
  if batch_size < 1 or start_step < 0:
    raise ValueError(f"need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}")
  data_config, builder = source.config, source.builder
  # Equal shards give every process the same epoch length (at most process_count - 1 of the
  # split's examples are never used).
  split = _local_split(data_config.train_split, process_index, process_count,
                       drop_remainder=True)
  num_examples = builder.info.splits[split].num_examples
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"split {data_config.train_split!r} of {data_config.name!r} has "
                     f"{num_examples} examples on process {process_index}, fewer than one "
                     f"batch of {batch_size}")
  epoch_size = steps_per_epoch * batch_size
  first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  examples = _read(source, split)
  skips = on_bad_example(data_config) == "skip"
  base_key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), process_index)
  transform = TRANSFORMS[data_config.transform]

  def example(key, ex):
    image = _decoded(builder, ex["image"]) if transform.train_decoded else ex["image"]
    if data_config.resize_on_device:
      out = transform.train_window(image, key, data_config)
    else:
      out = {"image": transform.train(image, key, data_config)}
    return {**out, "labels": ex["labels"], "example_id": ex["example_id"]}

  def epoch_examples(epoch):
    key = tf.random.experimental.stateless_fold_in(base_key, epoch)
    shuffle_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None,
                                               dtype=tf.int64)
    ds = examples.shuffle(data_config.shuffle_buffer, seed=shuffle_seed,
                          reshuffle_each_iteration=False)
    skip = tf.where(epoch == first_epoch, tf.constant(skip_steps * batch_size, tf.int64),
                    tf.constant(0, tf.int64))

    def keyed(position, ex):
      return tf.random.experimental.stateless_fold_in(key, position), ex

    if not skips:
      return ds.take(epoch_size).enumerate().skip(skip).map(keyed)
    ds = ds.repeat(_CYCLES).enumerate()
    if data_config.cache:  # bad records are known: blanks, dropped before any work
      ds = ds.filter(lambda position, ex: ex["ok"])
    else:  # the transform (decoding) fails on a bad record
      ds = ds.map(lambda position, ex: (position, example(*keyed(position, ex))),
                  num_parallel_calls=_AUTOTUNE).ignore_errors()
    ds = ds.take(epoch_size).apply(tf.data.experimental.assert_cardinality(epoch_size))

    def count_skipped(previous, item):
      position, ex = item
      return position, (position, {**ex, "skipped": tf.cast(position - previous - 1, tf.int32)})

    ds = ds.scan(tf.constant(-1, tf.int64), count_skipped).skip(skip)
    if data_config.cache:
      return ds.map(keyed)
    return ds.map(lambda position, ex: ex)

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
  if not skips or data_config.cache:
    ds = ds.map(lambda key, ex: {**example(key, ex),
                                 "skipped": ex.get("skipped", tf.constant(0, tf.int32))},
                num_parallel_calls=_AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(data_config.prefetch)
  return Batches(_options(ds), data_config, data_config.train_split, short_epoch=(
      f"too few examples decode to fill an epoch of {steps_per_epoch} batches of "
      f"{batch_size} from process {process_index}'s {num_examples} examples read "
      f"{_CYCLES} times over; prepare the dataset again"))


# --------------------------------------------------------------------------------- eval


def num_eval_batches(source: DataSource, split: str, *, batch_size: int,
                     process_count: int) -> int:
  """Batches every process yields for ``split``: its largest shard, rounded up."""
  sizes = [source.builder.info.splits[_local_split(split, i, process_count)].num_examples
           for i in range(process_count)]
  return math.ceil(max(sizes) / batch_size)


def _eval_tf_dataset(source: DataSource, split: str, batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  data_config, builder = source.config, source.builder
  local = _local_split(split, process_index, process_count)
  local_size = builder.info.splits[local].num_examples
  size = data_config.image_size
  num_labels = source.meta.num_labels
  transform = TRANSFORMS[data_config.transform]
  if data_config.resize_on_device:  # the host half: a uint8 canvas + where the image lies
    side = canvas_size(data_config)
    image_padding = {"image": tf.zeros((side, side, 3), tf.uint8),
                     "extent": tf.ones((2,), tf.int32), "origin": tf.zeros((2,), tf.int32)}
  else:
    image_padding = {"image": tf.zeros((size, size, 3), tf.float32)}
  padding = {**image_padding, "labels": tf.zeros((num_labels,), tf.int32),
             "example_id": tf.constant(-1, tf.int64), "valid": tf.constant(False),
             "skipped": tf.constant(False)}
  if "label_visible" in builder.info.features:
    padding["label_visible"] = tf.zeros((num_labels,), tf.bool)

  def evaluated(ex):
    ok = ex.pop("ok", tf.constant(True))  # False: a blank for an undecodable cached record
    if data_config.resize_on_device:
      image = transform.eval_window(ex.pop("image"), data_config)
    else:
      image = {"image": transform.eval(_decoded(builder, ex.pop("image")), data_config)}
    return {**ex, **image, "valid": ok, "skipped": tf.logical_not(ok)}

  ds = _read(source, local)
  if on_bad_example(data_config) == "skip" and not data_config.cache:
    # An example whose image does not decode keeps its place as a padding row.
    ds = ds.enumerate().map(lambda i, ex: (i, evaluated(dict(ex))),
                            num_parallel_calls=_AUTOTUNE).ignore_errors()
    ds = _refill(ds, local_size, {**padding, "skipped": tf.constant(True)})
  else:
    ds = ds.map(lambda ex: evaluated(dict(ex)), num_parallel_calls=_AUTOTUNE)
  total = num_eval_batches(source, split, batch_size=batch_size,
                           process_count=process_count) * batch_size
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(total - local_size))
  return _options(ds.batch(batch_size, drop_remainder=True).prefetch(data_config.prefetch))


def eval_dataset(source: DataSource, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Batches:
  """One pass over this process's shard: {image, labels, example_id, valid, skipped}
  batches (+ ``label_visible`` when the dataset has it).

  ``image`` is the eval transform's output, float (B, S, S, 3); with
  ``data.resize_on_device`` it is its host half instead (`ctran_eval_window`): uint8
  (B, C, C, 3) canvases (C = `canvas_size`), with ``extent`` and ``origin`` (B, 2) int32,
  which `ctran_jax.augment.centre_crop_windows` (in the eval step) turns into the images.

  Padding rows have ``valid=False``, ``example_id=-1`` and zero images/labels; every
  process yields exactly ``num_eval_batches(...)`` batches.  With
  ``on_bad_example="skip"`` an example whose image does not decode becomes such a row in
  its place, with ``skipped=True`` (elsewhere False), so the shards still cover the split
  in lockstep and metrics count only the examples that decode.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  key = (split, batch_size, process_index, process_count)
  if key not in source.eval_cache:
    source.eval_cache[key] = _eval_tf_dataset(source, *key)
  return Batches(source.eval_cache[key], source.config, split)
