"""PASCAL VOC 2007 (20 labels) through the builtin TFDS ``voc/2007``.

Prepare once (downloads ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar``,
~0.9 GB; the builtin builder takes them from ``<data_dir>/downloads/manual`` first):

    python -c "import tensorflow_datasets as tfds; \
        tfds.builder('voc/2007', data_dir=D).download_and_prepare()"

then train with ``configs/voc.py`` (``data.name = "voc/2007"``).  Splits: train 2501,
validation 2510 (together the reference's *trainval*, 5011 images) and test 4952.

Labels: image-level multi-hots derived from the box annotations.  A class is positive iff
the image has at least one object of that class that is *not* marked difficult: objects
marked difficult are skipped, so a class present only through difficult objects is a
negative, as in the reference loader (which skips difficult objects while parsing the XML).
The builtin's own ``labels`` / ``labels_no_difficult`` sequences are not used, so the rule is
stated here, in one place.

Label order is the builtin ClassLabel order, the standard alphabetical VOC order (aeroplane,
bicycle, bird, ... tvmonitor; ``VOC_LABELS``), which is also the reference's order.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from ctran_jax.data import adapters, common

VOC_LABELS = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


@adapters.register("voc")
def voc_adapter(builder: tfds.core.DatasetBuilder) -> adapters.Adapter:
  """Adapter for any ``voc/<year>`` builder; label names come from its ClassLabel."""
  names = tuple(builder.info.features["objects"]["label"].names)
  if names != VOC_LABELS:  # a changed builtin would silently permute every label
    raise ValueError(f"builtin {builder.name!r} has object classes {names}, expected the "
                     f"standard VOC order {VOC_LABELS}; update ctran_jax/data/voc.py")

  def to_example(ex: dict) -> dict:
    objects = ex["objects"]  # difficult objects make no label positive
    kept = tf.boolean_mask(objects["label"], tf.logical_not(objects["is_difficult"]))
    return {"image": ex["image"], "labels": common.multi_hot_graph(kept, len(names))}

  return adapters.Adapter(label_names=names, to_example=to_example)
