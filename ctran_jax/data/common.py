"""What the ``ctran_*`` builders share: the base features, multi-hot labels, the manual dir.

Every dataset the pipeline reads has an ``image`` and a multi-hot ``labels`` (L,) uint8;
the builders add their own extra features to that base.  Labels are made multi-hot in two
places that cannot share code: builders in Python (numpy, `multi_hot`) while writing
records, adapters of builtin TFDS datasets inside the tf.data graph (`multi_hot_graph`),
where numpy would need a Python callback per example.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def features(num_labels: int, image: tfds.features.Image | None = None,
             **extra) -> tfds.features.FeaturesDict:
  """``image`` (default: JPEG, stored as the original bytes), ``labels`` (L,) uint8, extras."""
  return tfds.features.FeaturesDict({
      "image": image or tfds.features.Image(encoding_format="jpeg"),
      "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8),
      **extra,
  })


def multi_hot(indices, num_labels: int) -> np.ndarray:
  """uint8 (num_labels,): 1 at each of ``indices`` (repeats allowed; none: all zeros)."""
  labels = np.zeros(num_labels, np.uint8)
  labels[np.asarray(list(indices), np.int64)] = 1
  return labels


def multi_hot_graph(class_ids: tf.Tensor, num_labels: int) -> tf.Tensor:
  """In-graph `multi_hot`: int32 (num_labels,) from a vector of class ids."""
  ids = tf.cast(tf.reshape(class_ids, [-1]), tf.int64)
  hits = tf.equal(ids[:, None], tf.range(num_labels, dtype=tf.int64)[None, :])
  return tf.cast(tf.reduce_any(hits, axis=0), tf.int32)


def manual_dir(builder: tfds.core.DatasetBuilder, dl_manager) -> str:
  """``dl_manager.manual_dir`` once it holds every file ``builder`` needs.

  Else a FileNotFoundError that lists the missing files (``missing_manual_files``) and
  where to get them; TFDS itself raises a bare AssertionError for a missing or empty dir.
  """
  try:
    path = os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # not given, missing or empty: everything is missing
    with tempfile.TemporaryDirectory() as empty:
      missing = builder.missing_manual_files(empty)
    raise FileNotFoundError(f"{str(e).splitlines()[0]}\n{builder.name} needs:\n  "
                            + "\n  ".join(missing)) from None
  missing = builder.missing_manual_files(path)
  if missing:
    raise FileNotFoundError(f"{builder.name}: missing in the manual_dir {path}:\n  "
                            + "\n  ".join(missing))
  return path
