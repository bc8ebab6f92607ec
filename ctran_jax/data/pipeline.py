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
``info.metadata["label_names"]`` is used when present.  Builders that declare
``GENERATED = True`` (``ctran_demo``) are built on first use.

Data config fields (see ``default_data_config``):
  name: TFDS name, optionally with config/version (``ctran_demo``, ``ctran_demo/tiny``).
  data_dir: TFDS data directory (None = the TFDS default, ``~/tensorflow_datasets``).
  prepare: also run ``download_and_prepare`` for builders that are not generated.
  train_split, eval_split, test_split: TFDS split names (slices such as ``train[:90%]`` work).
  image_size: model input side S.
  scale_size: side of the square resize every image gets first.
  crop_sizes: train crops: a square of a size drawn uniformly from these, at a uniform
    random position of the ``scale_size`` image, then resized to S (the reference recipe).
  flip: random horizontal flips in training.
  mean, std: per-channel normalisation on the 0..1 scale (ImageNet by default).
  shuffle_buffer: examples in the shuffle buffer (>= split size gives a full permutation).
  prefetch: batches prefetched.
  cache: keep decoded images in memory (good for small datasets such as the demo).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ctran_jax.data import demo  # noqa: F401  (registers ctran_demo with TFDS)

try:  # TF only feeds the host; the accelerators belong to JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU support
  pass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ID_BUCKETS = 2**62
_AUTOTUNE = tf.data.AUTOTUNE


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """The demo's data config; ``overrides`` replace fields (unknown fields are an error)."""
  config = ml_collections.ConfigDict(dict(
      name="ctran_demo", data_dir=None, prepare=False,
      train_split="train", eval_split="validation", test_split="test",
      image_size=64, scale_size=72, crop_sizes=(72, 64, 56), flip=True,
      mean=IMAGENET_MEAN, std=IMAGENET_STD,
      shuffle_buffer=10_000, prefetch=2, cache=True))
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"unknown data config field {key!r}; fields: {sorted(config)}")
    config[key] = value
  return config


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  name: str
  num_labels: int
  label_names: tuple[str, ...]
  split_sizes: dict[str, int]


# ----------------------------------------------------------------------------- builders


def ctran_datasets() -> list[str]:
  """Names of the TFDS builders this package registers."""
  return sorted(n for n in tfds.list_builders(with_community_datasets=False)
                if n.startswith("ctran_"))


@functools.lru_cache(maxsize=16)
def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {name!r}; registered ctran datasets: "
                     f"{ctran_datasets()} (any TFDS builder with 'image' and multi-hot "
                     f"'labels' features works once its module is imported)") from e


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The dataset's builder, with its data on disk: generated datasets are built here."""
  name, data_dir = data_config.name, data_config.get("data_dir")
  builder = _builder(name, data_dir)
  features = builder.info.features
  for key in ("image", "labels"):
    if key not in features:
      raise ValueError(f"dataset {name!r} has no {key!r} feature (has {sorted(features)}); "
                       "the pipeline needs 'image' and multi-hot 'labels' (L,)")
  if not builder.is_prepared():
    if getattr(builder, "GENERATED", False) or data_config.get("prepare", False):
      builder.download_and_prepare()
    else:
      raise FileNotFoundError(
          f"dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it once with\n"
          f"  python -c \"import tensorflow_datasets as tfds; import ctran_jax.data; "
          f"tfds.builder('{name}', data_dir={data_dir!r}).download_and_prepare()\"\n"
          "(or set data.prepare=True); manually downloaded archives go in "
          "<data_dir>/downloads/manual.")
  return builder


def dataset_meta(data_config) -> DatasetMeta:
  """Label count, names and split sizes; prepares the dataset first if it is generated.

  In a multi-process job on a shared filesystem, let one process prepare it first.
  """
  builder = prepared_builder(data_config)
  info = builder.info
  num_labels = int(info.features["labels"].shape[0])
  names = tuple(info.metadata.get("label_names", ())) if info.metadata else ()
  if len(names) != num_labels:
    names = tuple(f"label_{i}" for i in range(num_labels))
  return DatasetMeta(name=data_config.name, num_labels=num_labels, label_names=names,
                     split_sizes={k: int(v.num_examples) for k, v in info.splits.items()})


# ---------------------------------------------------------------------------- transforms


def check_transform(data_config) -> None:
  """Raises ValueError on image/crop sizes or statistics that cannot work together."""
  s, scale = data_config.image_size, data_config.scale_size
  crops = tuple(data_config.crop_sizes)
  if not 0 < s <= scale:
    raise ValueError(f"need 0 < image_size <= scale_size (the eval centre crop), "
                     f"got image_size={s}, scale_size={scale}")
  if not crops or not all(0 < c <= scale for c in crops):
    raise ValueError(f"crop_sizes must be non-empty and in (0, scale_size={scale}], got {crops}")
  if len(data_config.mean) != 3 or len(data_config.std) != 3 or min(data_config.std) <= 0:
    raise ValueError(f"mean/std need 3 channels and std > 0, got {data_config.mean}, "
                     f"{data_config.std}")


def _normalise(image: tf.Tensor, data_config) -> tf.Tensor:
  mean = tf.constant(data_config.mean, tf.float32)
  std = tf.constant(data_config.std, tf.float32)
  return (image / 255.0 - mean) / std


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to (size, size), antialiased when shrinking (as PIL, the reference's)."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] is not None and image.shape[0] == image.shape[1] == size:
    return image
  shrinking = tf.reduce_max(tf.shape(image)[:2]) > size
  # Upsampling is identical either way; the plain kernel is ~2x faster.
  return tf.cond(shrinking, lambda: tf.image.resize(image, (size, size), antialias=True),
                 lambda: tf.image.resize(image, (size, size)))


def random_crop_box(seed, data_config) -> tf.Tensor:
  """Train crop of the ``scale_size`` image as a ``crop_and_resize`` box, x-swapped to flip.

  A square of a size drawn from ``crop_sizes`` at a uniform position; the box is for the
  image padded by one edge pixel (see ``crop_resize_flip``).
  """
  scale, size = data_config.scale_size, data_config.image_size
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  crops = tf.constant(tuple(data_config.crop_sizes), tf.int32)
  crop = crops[tf.random.stateless_uniform([], seeds[0], 0, len(crops), tf.int32)]
  top = tf.random.stateless_uniform([], seeds[1], 0, scale - crop + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, scale - crop + 1, tf.int32)
  crop, top, left = (tf.cast(v, tf.float32) for v in (crop, top, left))
  # Sample points of a half-pixel-centre resize of the crop: top + (i + 0.5) * crop/size
  # - 0.5, i < size, shifted by the one-pixel pad, in units of (padded side - 1).
  step, extent = crop / size, scale + 1.0
  y1 = (top + 1.0 + 0.5 * step - 0.5) / extent
  x1 = (left + 1.0 + 0.5 * step - 0.5) / extent
  span = (size - 1) * step / extent
  x2 = x1 + span
  if data_config.flip:
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
  return tf.stack([y1, x1, y1 + span, x2])


def crop_resize_flip(images, boxes, data_config) -> tf.Tensor:
  """A batch of ``scale_size`` images → crops resized to image_size (bilinear) → normalised.

  Equals slice + ``tf.image.resize`` except that an upsampled crop's outermost pixels
  interpolate with the true neighbours instead of clamping at the crop's edge (the edge
  pad reproduces the clamp at the image border), and that shrinking crops are not
  antialiased (they shrink by at most scale_size / image_size).
  """
  size = data_config.image_size
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
  crops = tf.image.crop_and_resize(padded, boxes, tf.range(tf.shape(images)[0]), (size, size))
  return _normalise(crops, data_config)


def centre_crop(image, data_config) -> tf.Tensor:
  """Eval: resize to scale → centre crop image_size (torchvision's rounding)."""
  scale, size = data_config.scale_size, data_config.image_size
  offset = int(round((scale - size) / 2.0))
  image = _resize(image, scale)[offset:offset + size, offset:offset + size]
  return _normalise(image, data_config)


# ------------------------------------------------------------------------------ reading


def _read(builder, split, data_config) -> tf.data.Dataset:
  """Records in file order as {example_id, image (decoded when cached, else bytes), labels}."""
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
  ds = builder.as_dataset(split, shuffle_files=False, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {
      "example_id": tf.strings.to_hash_bucket_fast(ex["tfds_id"], _ID_BUCKETS),
      "image": ex["image"],
      "labels": tf.cast(ex["labels"], tf.int32)})
  if data_config.get("cache", False):
    ds = ds.map(functools.partial(_decode, builder), num_parallel_calls=_AUTOTUNE).cache()
  return ds


def _decode(builder, ex):
  if ex["image"].dtype == tf.string:
    ex = {**ex, "image": builder.info.features["image"].decode_example(ex["image"])}
  return ex


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


def train_dataset(data_config, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process training batches {image, labels, example_id}, from ``start_step``.

  An epoch is this process's shard shuffled with a seed from (seed, process, epoch), cut to
  whole batches; augmentation is keyed on (that epoch seed, position in epoch).  So batch
  k is the same whatever ``start_step`` was, and resuming costs one pass of the undecoded
  records of the current epoch up to ``start_step`` (plus filling the shuffle buffer).
  (``Dataset.shuffle`` also mixes in TF's global seed; nothing here sets it.)
  """
  if batch_size < 1 or start_step < 0:
    raise ValueError(f"need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}")
  check_transform(data_config)
  builder = prepared_builder(data_config)
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
  first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  examples = _read(builder, split, data_config)
  base_key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), process_index)

  def epoch_examples(epoch):
    key = tf.random.experimental.stateless_fold_in(base_key, epoch)
    shuffle_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None,
                                               dtype=tf.int64)
    ds = examples.shuffle(data_config.shuffle_buffer, seed=shuffle_seed,
                          reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * batch_size).enumerate()
    ds = ds.skip(tf.where(epoch == first_epoch, tf.constant(skip_steps * batch_size, tf.int64),
                          tf.constant(0, tf.int64)))
    return ds.map(lambda position, ex: (tf.random.experimental.stateless_fold_in(
        key, position), ex))

  def resize_and_draw_box(key, ex):
    return {"image": _resize(_decode(builder, ex)["image"], data_config.scale_size),
            "box": random_crop_box(key, data_config), "labels": ex["labels"],
            "example_id": ex["example_id"]}

  def augment(batch):  # one crop_and_resize for the batch is far cheaper than per image
    return {"image": crop_resize_flip(batch["image"], batch["box"], data_config),
            "labels": batch["labels"], "example_id": batch["example_id"]}

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
  ds = ds.map(resize_and_draw_box, num_parallel_calls=_AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).map(augment, num_parallel_calls=_AUTOTUNE)
  ds = ds.prefetch(data_config.prefetch)
  return iter(tfds.as_numpy(_options(ds)))


# --------------------------------------------------------------------------------- eval


def _local_sizes(data_config, split, process_count) -> list[int]:
  builder = prepared_builder(data_config)
  return [builder.info.splits[_local_split(split, i, process_count)].num_examples
          for i in range(process_count)]


def num_eval_batches(data_config, split: str, *, batch_size: int, process_count: int) -> int:
  """Batches every process yields for ``split``: its largest shard, rounded up."""
  return math.ceil(max(_local_sizes(data_config, split, process_count)) / batch_size)


@functools.lru_cache(maxsize=8)
def _eval_tf_dataset(key: str, split: str, batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  # Memoised on the config's JSON so that repeated evals reuse one in-memory cache.
  data_config = ml_collections.ConfigDict(json.loads(key))
  builder = prepared_builder(data_config)
  local = _local_split(split, process_index, process_count)
  size = data_config.image_size
  num_labels = builder.info.features["labels"].shape[0]
  ds = _read(builder, local, data_config).map(
      lambda ex: {"image": centre_crop(_decode(builder, ex)["image"], data_config),
                  "labels": ex["labels"], "example_id": ex["example_id"],
                  "valid": tf.constant(True)},
      num_parallel_calls=_AUTOTUNE)
  total = num_eval_batches(data_config, split, batch_size=batch_size,
                           process_count=process_count) * batch_size
  padding = {"image": tf.zeros((size, size, 3), tf.float32),
             "labels": tf.zeros((num_labels,), tf.int32),
             "example_id": tf.constant(-1, tf.int64), "valid": tf.constant(False)}
  pad_count = total - builder.info.splits[local].num_examples
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad_count))
  return _options(ds.batch(batch_size, drop_remainder=True).prefetch(data_config.prefetch))


def eval_dataset(data_config, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard: {image, labels, example_id, valid} batches.

  Padding rows have ``valid=False``, ``example_id=-1`` and zero images/labels; every
  process yields exactly ``num_eval_batches(...)`` batches.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  check_transform(data_config)
  ds = _eval_tf_dataset(data_config.to_json(), split, batch_size, process_index, process_count)
  return iter(tfds.as_numpy(ds))
