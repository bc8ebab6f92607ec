"""VOC-2007 through the builtin TFDS ``voc/2007``: the adapter's labels, the pipeline, a tiny run.

No VOC data: ``tfds.testing.mock_data`` fakes the builtin's examples.  Its default random
examples give the ``objects`` fields unequal lengths (real annotations never do), and
encoding them, which reading with ``SkipDecoding`` needs, fails; so the pipeline tests
serve their own consistent random examples through ``mock_data(as_dataset_fn=...)``, with
split sizes from a ``dataset_info.json`` written for the test.
"""

import contextlib
import functools
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import voc as voc_config
from ctran_jax import train
from ctran_jax.data import adapters, pipeline, voc

NUM_LABELS = 20
SPLIT_SIZES = {"train": 8, "validation": 8, "test": 8}


def expected_multi_hot(labels, difficult) -> np.ndarray:
  """Independent numpy statement of the rule: positive iff a non-difficult object has it."""
  out = np.zeros(NUM_LABELS, np.int32)
  for label, is_difficult in zip(labels, difficult, strict=True):
    if not is_difficult:
      out[label] = 1
  return out


def test_label_names_are_the_builtin_class_order():
  builder = tfds.builder("voc/2007")
  adapter = adapters.adapter_for(builder)
  assert adapter is not None and "voc" in adapters.registered()
  assert adapter.label_names == tuple(builder.info.features["objects"]["label"].names)
  assert adapter.num_labels == NUM_LABELS
  assert adapter.label_names[:3] == ("aeroplane", "bicycle", "bird")
  assert adapter.label_names[10] == "diningtable" and adapter.label_names[-1] == "tvmonitor"
  assert list(adapter.label_names) == sorted(adapter.label_names)


def test_difficult_objects_do_not_make_a_label_positive():
  to_example = adapters.adapter_for(tfds.builder("voc/2007")).to_example
  cases = [  # (object labels, difficult flags, positive classes)
      ([14, 14, 3], [True, False, True], {14}),   # person: one easy object; boat: difficult only
      ([7, 7], [True, True], set()),              # cat only difficult -> negative
      ([0, 19, 11], [False, False, False], {0, 19, 11}),
      ([], [], set()),                            # no objects: all zeros
  ]
  for labels, difficult, positives in cases:
    ex = {"image": tf.constant(b"jpeg"),
          "objects": {"label": tf.constant(labels, tf.int64),
                      "is_difficult": tf.constant(difficult, tf.bool)}}
    out = to_example(ex)
    want = np.zeros(NUM_LABELS, np.int32)
    want[sorted(positives)] = 1
    assert out["labels"].dtype == tf.int32 and out["labels"].shape == (NUM_LABELS,)
    np.testing.assert_array_equal(out["labels"].numpy(), want)
    assert out["image"].numpy() == b"jpeg"


def test_adapter_on_mock_examples():
  with tfds.testing.mock_data(num_examples=12):
    builder = tfds.builder("voc/2007")
    to_example = adapters.adapter_for(builder).to_example
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
  positives = 0
  for raw in examples:
    # The mock draws each sequence field's length on its own; cut them to a common length.
    n = min(len(raw["objects"]["label"]), len(raw["objects"]["is_difficult"]))
    labels, difficult = raw["objects"]["label"][:n], raw["objects"]["is_difficult"][:n]
    out = to_example({"image": tf.constant(b""),
                      "objects": {"label": tf.constant(labels),
                                  "is_difficult": tf.constant(difficult)}})["labels"].numpy()
    assert out.shape == (NUM_LABELS,) and set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(out, expected_multi_hot(labels, difficult))
    positives += out.sum()
  assert positives > 0


# ----------------------------------------------------------------------------- pipeline


def raw_example(index: int) -> dict:
  """A consistent fake VOC example (0-5 objects, some difficult, random image size)."""
  rng = np.random.default_rng(index)
  n = int(rng.integers(0, 6))
  boxes = np.sort(rng.uniform(size=(n, 2, 2)), axis=1).reshape(n, 4).astype(np.float32)
  labels = rng.integers(0, NUM_LABELS, size=n)
  difficult = rng.random(n) < 0.3
  h, w = (int(v) for v in rng.integers(8, 40, size=2))
  return {
      "image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
      "image/filename": f"{index:06d}.jpg",
      "objects": {"label": labels, "bbox": boxes, "pose": rng.integers(0, 5, size=n),
                  "is_truncated": rng.random(n) < 0.5, "is_difficult": difficult},
      "labels": sorted(set(labels.tolist())),
      "labels_no_difficult": sorted(set(labels[~difficult].tolist())),
  }


def expected_rows(count: int) -> list[tuple]:
  return sorted(tuple(expected_multi_hot(ex["objects"]["label"], ex["objects"]["is_difficult"]))
                for ex in map(raw_example, range(count)))


def consistent_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """``mock_data``'s ``as_dataset_fn``: as many examples as the split's recorded size."""
  del kwargs
  features = self.info.features
  count = self.info.splits[split].num_examples
  encoded = [features.encode_example(raw_example(i)) for i in range(count)]
  specs = features.get_serialized_info()
  ds = tf.data.Dataset.from_generator(
      lambda: iter(encoded),
      output_types=tf.nest.map_structure(lambda t: t.dtype, specs),
      output_shapes=tf.nest.map_structure(lambda t: t.shape, specs))
  ds = ds.map(functools.partial(features.decode_example, decoders=decoders))
  if read_config and read_config.add_tfds_id:
    ids = tf.data.Dataset.from_tensor_slices([f"voc-{split}__{i}" for i in range(count)])
    ds = tf.data.Dataset.zip(ds, ids).map(lambda ex, i: {**ex, "tfds_id": i})
  return ds


@contextlib.contextmanager
def mock_voc(tmp_path):
  """voc/2007 served by ``consistent_as_dataset``, 'prepared' with SPLIT_SIZES examples."""
  meta_dir = str(tmp_path / "voc_meta")
  builder = tfds.builder("voc/2007", data_dir=meta_dir)
  template = functools.partial(tfds.core.ShardedFileTemplate, data_dir=builder.data_dir,
                               dataset_name=builder.name, filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0,
                          filename_template=template(split=name))
      for name, size in SPLIT_SIZES.items()]))
  tf.io.gfile.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(data_dir=meta_dir, as_dataset_fn=consistent_as_dataset):
    # mock_data's as_dataset only takes keywords; the pipeline passes the split by position.
    mocked = tfds.core.DatasetBuilder.as_dataset
    with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset",
                           lambda self, split=None, **kw: mocked(self, split=split, **kw)):
      yield


def voc_data_config(tmp_path):
  c = voc_config.get_config().data
  c.data_dir = str(tmp_path / "unused")  # mock_data redirects it; keys the pipeline caches
  c.image_size, c.scale_size, c.crop_sizes = 32, 36, (36, 32, 28)
  c.shuffle_buffer = 64
  return c


def test_pipeline_reads_voc_through_the_adapter(tmp_path):
  data = voc_data_config(tmp_path)
  assert (data.name, data.train_split, data.eval_split) == ("voc/2007", "train+validation",
                                                            "test")
  with mock_voc(tmp_path):
    meta = pipeline.open_source(data).meta
    assert meta.num_labels == NUM_LABELS and meta.label_names == voc.VOC_LABELS
    batches = list(pipeline.eval_dataset(pipeline.open_source(data), "test", batch_size=3))
    train_batch = next(pipeline.train_dataset(pipeline.open_source(data), batch_size=4, seed=0))
  assert len(batches) == 3  # 8 examples -> 3 batches of 3, one padding row
  labels = np.concatenate([b["labels"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert labels.shape == (9, NUM_LABELS) and valid.sum() == 8
  assert sorted(map(tuple, labels[valid])) == expected_rows(8)
  # The recipe resizes on the device: the host ships the decoded crop in a 36^2 canvas.
  assert data.resize_on_device
  assert train_batch["image"].shape == (4, 36, 36, 3) and train_batch["image"].dtype == "uint8"
  assert train_batch["window"].shape == (4, 2) and (train_batch["window"] <= 36).all()
  assert train_batch["labels"].shape == (4, NUM_LABELS)
  train_rows = set(expected_rows(16))  # train+validation = 16 examples
  assert all(tuple(row) in train_rows for row in train_batch["labels"])


# ----------------------------------------------------------------------------- config + run


def test_voc_config_is_the_coco_recipe_with_two_micro_batches():
  from configs import coco
  full, reference = voc_config.get_config(), coco.get_config()
  assert (full.batch_size, full.grad_accum_steps) == (32, 2)
  assert full.batch_size // full.grad_accum_steps == reference.batch_size  # 16 per backward
  assert full.loss.reduction == "sum" and full.data.test_split == ""
  for key in ("model", "optimizer", "schedule", "lmt"):
    assert full[key].to_dict() == reference[key].to_dict(), key
  tiny = voc_config.get_config("tiny")
  assert tiny.data.name == "ctran_demo" and tiny.grad_accum_steps == 2
  train.check_config(full)
  train.check_config(tiny)
  with pytest.raises(ValueError, match="variant"):
    voc_config.get_config("huge")


# One short training run of the VOC recipe (tiny backbone), with -m slow.
@pytest.mark.slow  # CI time (the COCO recipe, which VOC builds on, trains in test_data_coco)
def test_tiny_training_run_on_mock_voc(tmp_path):
  c = voc_config.get_config()
  c.data = voc_data_config(tmp_path)
  c.model.backbone_depth, c.model.backbone_width = 0, 8
  c.model.backbone_block = "bottleneck"
  c.model.hidden, c.model.layers = 32, 1
  c.optimizer.learning_rate = 1e-4
  c.batch_size, c.grad_accum_steps = 4, 2
  c.mesh.num_devices = 2            # micro-batches of 2
  c.num_epochs, c.num_train_steps = 0.0, 3
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 3, 3
  c.eval.batch_size, c.eval.known_fractions = 4, (0.0,)
  with mock_voc(tmp_path):
    result = train.train_and_evaluate(c, str(tmp_path / "work"))
  losses = [r["loss"] for r in result["train_log"]]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  report = result["reports"]["test"]
  assert report["num_examples"] == 8
  assert 0.0 <= report["known"]["0"]["mAP"] <= 1.0
  print(f"voc tiny run: losses {losses}, test mAP {report['known']['0']['mAP']:.3f}")
