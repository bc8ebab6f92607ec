"""COCO-2014: the ``ctran_coco2014`` builder on a tiny fixture in the original file layout,
the adapter for builtin TFDS ``coco/2014`` (under ``tfds.testing.mock_data``), the pipeline
on both, and a short training run of ``configs/coco.py`` on the fixture.

The fixture is written here: real zips (``train2014.zip``, ``val2014.zip``,
``annotations_trainval2014.zip``) holding small real JPEGs and instances JSONs in the real
schema, with images and annotations listed out of id order, one image without annotations,
crowd annotations, and a greyscale JPEG.  Expected labels are written by hand as label
indices (COCO category ids in increasing order -> 0..79).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import zipfile
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import default_data_config
from PIL import Image

from ctran_jax.data import adapters, coco, pipeline

# The 80 COCO categories, "id name" in id order (written out independently of coco.py).
COCO80 = """1 person|2 bicycle|3 car|4 motorcycle|5 airplane|6 bus|7 train|8 truck|9 boat
|10 traffic light|11 fire hydrant|13 stop sign|14 parking meter|15 bench|16 bird|17 cat
|18 dog|19 horse|20 sheep|21 cow|22 elephant|23 bear|24 zebra|25 giraffe|27 backpack
|28 umbrella|31 handbag|32 tie|33 suitcase|34 frisbee|35 skis|36 snowboard|37 sports ball
|38 kite|39 baseball bat|40 baseball glove|41 skateboard|42 surfboard|43 tennis racket
|44 bottle|46 wine glass|47 cup|48 fork|49 knife|50 spoon|51 bowl|52 banana|53 apple
|54 sandwich|55 orange|56 broccoli|57 carrot|58 hot dog|59 pizza|60 donut|61 cake|62 chair
|63 couch|64 potted plant|65 bed|67 dining table|70 toilet|72 tv|73 laptop|74 mouse
|75 remote|76 keyboard|77 cell phone|78 microwave|79 oven|80 toaster|81 sink
|82 refrigerator|84 book|85 clock|86 vase|87 scissors|88 teddy bear|89 hair drier
|90 toothbrush"""
CATS = [(int(e.split(" ", 1)[0]), e.split(" ", 1)[1]) for e in COCO80.replace("\n", "").split("|")]
NAMES = [name for _, name in CATS]
IDS = [cid for cid, _ in CATS]

# image id -> (height, width, greyscale, [(category id, iscrowd), ...]) per split.
TRAIN = {
    61: (30, 40, False, [(5, 0)]),
    9: (24, 36, False, [(1, 0), (3, 0), (1, 0)]),
    25: (40, 30, False, [(90, 0)]),
    30: (28, 28, False, []),                       # no annotations
    34: (32, 48, False, [(18, 1)]),                # crowd-only
    36: (36, 36, False, [(13, 0), (67, 0)]),
    42: (26, 34, False, [(1, 0), (62, 0)]),
    49: (44, 32, False, [(44, 0), (88, 1)]),       # one crowd, one not
}
VAL = {
    136: (30, 30, False, [(23, 0), (24, 0), (25, 0)]),
    73: (34, 26, False, [(2, 0), (2, 0)]),
    74: (28, 38, False, []),
    133: (40, 40, False, [(65, 0), (1, 1)]),
    139: (32, 30, True, []),                       # greyscale, no annotations
}
# Expected positives as label indices, worked out by hand from the table above.
EXPECTED = {
    "train2014": {9: [0, 2], 25: [79], 30: [], 34: [16], 36: [11, 60], 42: [0, 56],
                  49: [39, 77], 61: [4]},
    "val2014": {73: [1], 74: [], 133: [0, 59], 136: [21, 22, 23], 139: []},
}
SPLITS = {"train2014": TRAIN, "val2014": VAL}


def multi_hot(indices) -> np.ndarray:
  row = np.zeros(80, np.int64)
  row[list(indices)] = 1
  return row


def file_name(split: str, image_id: int) -> str:
  return f"COCO_{split}_{image_id:012d}.jpg"


def jpeg(image_id: int, height: int, width: int, grey: bool) -> bytes:
  rng = np.random.default_rng(image_id)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  image = Image.fromarray(pixels).convert("L") if grey else Image.fromarray(pixels)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def instances(split: str, images: dict, *, extra_annotations=()) -> dict:
  """An instances_<split>.json document (real schema), listed out of id order."""
  doc = {"info": {"description": "fixture", "year": 2014}, "licenses": [],
         "images": [], "annotations": [],
         "categories": [{"supercategory": "thing", "id": i, "name": n} for i, n in CATS]}
  for image_id, (h, w, _, anns) in images.items():  # dict order, not id order
    doc["images"].append({"id": image_id, "file_name": file_name(split, image_id),
                          "height": h, "width": w, "license": 1, "coco_url": "",
                          "date_captured": "2013-11-14 16:28:13"})
    for category_id, crowd in anns:
      segmentation = ({"counts": [1, 2, 3], "size": [h, w]} if crowd
                      else [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]])
      doc["annotations"].append({
          "id": 1000 * image_id + len(doc["annotations"]), "image_id": image_id,
          "category_id": category_id, "iscrowd": crowd, "area": 8.0,
          "bbox": [1.0, 1.0, 4.0, 4.0], "segmentation": segmentation})
  doc["annotations"].extend(extra_annotations)
  doc["annotations"].reverse()
  return doc


def write_fixture(root, *, layout="zip", extra_annotations=None) -> dict:
  """The original COCO-2014 files under ``root``; returns {(split, id): jpeg bytes}."""
  os.makedirs(root, exist_ok=True)
  extra_annotations = extra_annotations or {}
  jpegs = {}
  for split, images in SPLITS.items():
    for image_id, (h, w, grey, _) in images.items():
      jpegs[split, image_id] = jpeg(image_id, h, w, grey)
  docs = {f"annotations/instances_{split}.json": json.dumps(
      instances(split, images, extra_annotations=extra_annotations.get(split, ())))
      for split, images in SPLITS.items()}
  write_files(root, layout, jpegs, docs, other=("instances_", "captions_"))
  return jpegs


def write_files(root, layout, jpegs, docs, other) -> None:
  """COCO-2014's files under ``root``: ``{(split, id): jpeg}`` as the image zips ("zip")
  or folders, ``{member: text}`` as the annotation zip or folder, each with its twin named
  by ``other`` = (this kind, the other kind) present but empty (not read)."""
  if layout == "zip":
    for split in sorted({split for split, _ in jpegs}):
      with zipfile.ZipFile(os.path.join(root, f"{split}.zip"), "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{split}/", "")
        for (s, image_id), data in jpegs.items():
          if s == split:
            z.writestr(f"{split}/{file_name(split, image_id)}", data)
    with zipfile.ZipFile(os.path.join(root, "annotations_trainval2014.zip"), "w",
                         zipfile.ZIP_DEFLATED) as z:
      for member, text in docs.items():
        z.writestr(member, text)
        z.writestr(member.replace(*other), "{}")
  else:
    for (split, image_id), data in jpegs.items():
      os.makedirs(os.path.join(root, split), exist_ok=True)
      with open(os.path.join(root, split, file_name(split, image_id)), "wb") as f:
        f.write(data)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for member, text in docs.items():
      with open(os.path.join(root, member), "w") as f:
        f.write(text)


def build(manual_dir, data_dir, name="ctran_coco2014") -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def read_split(builder, split) -> list[dict]:
  ds = builder.as_dataset(split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return list(tfds.as_numpy(ds))


@pytest.fixture(scope="module")
def coco_zip(tmp_path_factory):
  """(manual_dir, data_dir, jpegs, builder) of the fixture built from the zips."""
  root = tmp_path_factory.mktemp("coco")
  jpegs = write_fixture(root / "manual")
  builder = build(root / "manual", root / "tfds")
  return root / "manual", str(root / "tfds"), jpegs, builder


# ---------------------------------------------------------------------------- builder


def test_builder_labels_splits_and_metadata(coco_zip):
  _, _, jpegs, builder = coco_zip
  info = builder.info
  assert builder.name == "ctran_coco2014"
  assert {k: v.num_examples for k, v in info.splits.items()} == {"train2014": 8, "val2014": 5}
  assert info.metadata["label_names"] == NAMES
  assert info.metadata["category_ids"] == IDS
  assert info.metadata["label_names"][16] == "dog" and info.metadata["category_ids"][16] == 18
  assert info.metadata["unlabelled_images"] == {"train2014": 1, "val2014": 2}
  for split, expected in EXPECTED.items():
    examples = read_split(builder, split)
    assert sorted(int(ex["image/id"]) for ex in examples) == sorted(expected)
    for ex in examples:
      image_id = int(ex["image/id"])
      assert ex["labels"].dtype == np.uint8 and ex["labels"].shape == (80,)
      np.testing.assert_array_equal(ex["labels"], multi_hot(expected[image_id]),
                                    err_msg=f"{split} image {image_id}")
      assert ex["image/filename"].decode() == file_name(split, image_id)
      assert ex["image"] == jpegs[split, image_id]  # the original bytes, not re-encoded


def test_metadata_survives_reloading(coco_zip):
  _, data_dir, _, _ = coco_zip
  info = tfds.builder("ctran_coco2014", data_dir=data_dir).info
  assert info.metadata["unlabelled_images"] == {"train2014": 1, "val2014": 2}
  assert info.metadata["label_names"] == NAMES


def test_extracted_folders_give_a_byte_identical_dataset(coco_zip, tmp_path):
  _, zip_data_dir, _, _ = coco_zip
  write_fixture(tmp_path / "manual", layout="folders")
  assert not glob.glob(str(tmp_path / "manual" / "*.zip"))
  build(tmp_path / "manual", tmp_path / "tfds")
  records = sorted(glob.glob(os.path.join(zip_data_dir, "ctran_coco2014", "*", "*.tfrecord*")))
  assert len(records) == 2
  for path in records:
    twin = os.path.join(str(tmp_path / "tfds"), os.path.relpath(path, zip_data_dir))
    with open(path, "rb") as a, open(twin, "rb") as b:
      assert a.read() == b.read(), os.path.basename(path)


def test_missing_files_are_listed_exactly(tmp_path):
  full = tmp_path / "full"
  write_fixture(full)
  assert coco.CtranCoco2014.missing_manual_files(str(full)) == []

  partial = tmp_path / "partial"  # val images (zip) + val annotations (extracted) only
  os.makedirs(partial / "annotations")
  os.rename(full / "val2014.zip", partial / "val2014.zip")
  with zipfile.ZipFile(full / "annotations_trainval2014.zip") as z:
    z.extract("annotations/instances_val2014.json", partial)
  missing = coco.CtranCoco2014.missing_manual_files(str(partial))
  assert len(missing) == 2
  assert missing[0].startswith("train2014.zip (or folder train2014/)")
  assert "http://images.cocodataset.org/zips/train2014.zip" in missing[0]
  assert missing[1].startswith("annotations_trainval2014.zip")
  assert "instances_train2014.json" in missing[1] and "instances_val2014" not in missing[1]
  assert "http://images.cocodataset.org/annotations/annotations_trainval2014.zip" in missing[1]
  with pytest.raises(FileNotFoundError) as error:
    build(partial, tmp_path / "tfds")
  message = str(error.value)
  assert missing[0] in message and missing[1] in message and str(partial) in message
  assert "val2014.zip (or folder val2014/)" not in message

  empty = tmp_path / "empty"  # TFDS itself refuses an empty manual_dir; we still list
  os.makedirs(empty)
  assert len(coco.CtranCoco2014.missing_manual_files(str(empty))) == 3
  with pytest.raises(FileNotFoundError, match="val2014.zip \\(or folder val2014/\\)"):
    build(empty, tmp_path / "tfds_empty")


@pytest.mark.parametrize("bad, match", [
    ({"id": 7, "image_id": 73, "category_id": 12, "iscrowd": 0, "bbox": [0, 0, 1, 1],
      "area": 1.0, "segmentation": []}, "category id 12"),
    ({"id": 8, "image_id": 999, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1],
      "area": 1.0, "segmentation": []}, "image id 999"),
])
def test_unknown_ids_name_the_json_file(tmp_path, bad, match):
  write_fixture(tmp_path / "manual", extra_annotations={"val2014": [bad]})
  with pytest.raises(ValueError, match=match) as error:
    build(tmp_path / "manual", tmp_path / "tfds")
  assert "instances_val2014.json" in str(error.value)
  assert "annotations_trainval2014.zip" in str(error.value)


def test_wrong_categories_name_the_json_file(tmp_path):
  root = tmp_path / "manual"
  write_fixture(root, layout="folders")
  path = root / "annotations" / "instances_train2014.json"
  doc = json.loads(path.read_text())
  doc["categories"][0]["name"] = "human"
  path.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="instances_train2014.json.*not the 80"):
    build(root, tmp_path / "tfds")


# ---------------------------------------------------------------------------- pipeline


def coco_data_config(data_dir):
  return default_data_config(
      name="ctran_coco2014", data_dir=data_dir, train_split="train2014", eval_split="val2014",
      test_split="", image_size=32, scale_size=40, crop_sizes=(40, 32))


def test_pipeline_yields_the_expected_labels(coco_zip):
  _, data_dir, _, builder = coco_zip
  config = coco_data_config(data_dir)
  meta = pipeline.open_source(config).meta
  assert meta.num_labels == 80 and list(meta.label_names) == NAMES
  assert meta.split_sizes == {"train2014": 8, "val2014": 5}

  batches = pipeline.train_dataset(pipeline.open_source(config), batch_size=4, seed=0)
  seen = []
  for _ in range(2):  # one epoch: every training image once
    batch = next(batches)
    assert batch["image"].shape == (4, 32, 32, 3) and np.isfinite(batch["image"]).all()
    assert batch["labels"].shape == (4, 80)
    seen += [tuple(row) for row in batch["labels"]]
  assert sorted(seen) == sorted(tuple(multi_hot(v)) for v in EXPECTED["train2014"].values())

  # Eval reads the split in file order: match rows to image ids by that order.
  order = [int(ex["image/id"]) for ex in read_split(builder, "val2014")]
  batches = list(pipeline.eval_dataset(pipeline.open_source(config), "val2014", batch_size=4))
  assert len(batches) == 2
  labels = np.concatenate([b["labels"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * 5 + [False] * 3
  expected = np.stack([multi_hot(EXPECTED["val2014"][i]) for i in order])
  np.testing.assert_array_equal(labels[:5], expected)
  np.testing.assert_array_equal(labels[5:], 0)
  assert batches[0]["image"].shape == (4, 32, 32, 3)
  assert np.isfinite(np.concatenate([b["image"] for b in batches])).all()


def test_coco_recipe_trains_on_the_fixture(coco_zip, tmp_path):
  from configs import coco as coco_config
  from ctran_jax import train

  _, data_dir, _, _ = coco_zip
  c = coco_config.get_config()
  c.data.data_dir = data_dir
  c.data.image_size, c.data.scale_size, c.data.crop_sizes = 32, 40, (40, 32)
  c.model.backbone_depth, c.model.backbone_width = 0, 8
  c.model.hidden, c.model.layers = 32, 1
  c.batch_size, c.eval.batch_size = 4, 4
  c.num_train_steps, c.num_epochs = 3, 0.0
  c.log_every_steps = 1
  c.eval_every_steps = 100          # evaluate once, at the end
  c.eval.known_fractions = (0.0,)
  c.mesh.num_devices = 1
  result = train.train_and_evaluate(c, str(tmp_path))
  losses = [r["loss"] for r in result["train_log"]]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  assert set(result["reports"]) == {"val2014"}
  report = result["reports"]["val2014"]["known"]["0"]
  assert np.isfinite(report["mAP"]) and 0.0 <= report["mAP"] <= 1.0


# ---------------------------------------------------------------- builtin coco/2014


def test_builtin_adapter_on_mock_examples():
  with tfds.testing.mock_data(num_examples=4):
    builder = tfds.builder("coco/2014")
    adapter = adapters.adapter_for(builder)
    assert adapter is not None and adapter.num_labels == 80
    assert list(adapter.label_names) == NAMES
    # Without decoders the mock's ragged fields need not agree in length; only `label`
    # is read.  Unnamed mock classes are in category-id order, i.e. our order.
    ds = builder.as_dataset(split="train").map(lambda ex: (ex, adapter.to_example(ex)))
    count = 0
    for raw, out in tfds.as_numpy(ds):
      assert out["labels"].shape == (80,) and out["labels"].dtype == np.int32
      assert set(np.unique(out["labels"])) <= {0, 1}
      expected = np.zeros(80, np.int64)
      for label in raw["objects"]["label"]:
        expected[label] = 1
      np.testing.assert_array_equal(out["labels"], expected)
      assert "objects" not in out and out["image"].shape == raw["image"].shape
      count += 1
    assert count == 4


class _FakeBuilder:
  """Just what the adapter factory reads: ``info.features`` and ``info.full_name``."""

  def __init__(self, names):
    label = tfds.features.ClassLabel(names=names)
    self.info = type("Info", (), {"features": {"objects": {"label": label}},
                                  "full_name": "coco/2014/1.1.0"})()


def test_builtin_adapter_matches_class_names():
  reversed_names = NAMES[::-1]  # a copy whose class order differs from ours
  adapter = coco.coco_adapter(_FakeBuilder(reversed_names))
  example = {"image": tf.constant(b"jpeg"), "tfds_id": tf.constant("x"),
             "objects": {"label": tf.constant([0, 3, 3], tf.int64),
                         "is_crowd": tf.constant([True, False, False])}}
  out = adapter.to_example(example)
  expected = multi_hot([NAMES.index(reversed_names[0]), NAMES.index(reversed_names[3])])
  np.testing.assert_array_equal(out["labels"].numpy(), expected)
  assert expected[79] == 1 and expected[76] == 1  # toothbrush, scissors
  assert out["image"].numpy() == b"jpeg" and out["tfds_id"].numpy() == b"x"
  empty = {"image": tf.constant(b""), "objects": {"label": tf.zeros([0], tf.int64),
                                                  "is_crowd": tf.zeros([0], tf.bool)}}
  np.testing.assert_array_equal(adapter.to_example(empty)["labels"].numpy(), np.zeros(80))
  with pytest.raises(ValueError, match="do not match"):
    coco.coco_adapter(_FakeBuilder(["thing"] + NAMES[1:]))


# Builtin-style examples for the pipeline test: (image id, object class indices).
BUILTIN_TRAIN = [(1, [0, 5]), (2, []), (3, [79, 79]), (4, [10]), (5, [1, 2, 3]), (6, [40])]
BUILTIN_VAL = [(11, [7]), (12, [0, 1]), (13, []), (14, [60, 61]), (15, [33])]


def _write_builtin_metadata(meta_dir, names):
  """A prepared-looking coco/2014 (dataset_info.json, class names) with our split sizes."""
  builder = tfds.builder("coco/2014", data_dir=str(meta_dir))
  builder.info.features["objects"]["label"].names = names
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name="coco",
                                           split="train", filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[len(rows)], num_bytes=0,
                          filename_template=template.replace(split=split))
      for split, rows in (("train", BUILTIN_TRAIN), ("validation", BUILTIN_VAL))]))
  os.makedirs(builder.data_path, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


def _builtin_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """Stands in for the prepared files: consistent objects and real JPEG bytes."""
  del decoders, kwargs
  name = str(split)
  rows = BUILTIN_VAL if "validation" in name else BUILTIN_TRAIN
  split_name = "validation" if "validation" in name else "train"

  def generate():
    for index, (image_id, labels) in enumerate(rows):
      n = len(labels)
      example = {
          "image": jpeg(image_id, 24, 20, image_id == 13),
          "image/filename": f"{image_id}.jpg", "image/id": image_id,
          "objects": {"label": np.array(labels, np.int64), "is_crowd": np.zeros(n, bool),
                      "area": np.ones(n, np.int64), "id": np.arange(n, dtype=np.int64),
                      "bbox": np.zeros((n, 4), np.float32)}}
      if read_config is not None and read_config.add_tfds_id:
        example["tfds_id"] = f"coco-{split_name}.tfrecord-00000-of-00001__{index}"
      yield example

  signature = {"image": tf.TensorSpec([], tf.string),
               "image/filename": tf.TensorSpec([], tf.string),
               "image/id": tf.TensorSpec([], tf.int64),
               "objects": {"label": tf.TensorSpec([None], tf.int64),
                           "is_crowd": tf.TensorSpec([None], tf.bool),
                           "area": tf.TensorSpec([None], tf.int64),
                           "id": tf.TensorSpec([None], tf.int64),
                           "bbox": tf.TensorSpec([None, 4], tf.float32)}}
  if read_config is not None and read_config.add_tfds_id:
    signature["tfds_id"] = tf.TensorSpec([], tf.string)
  return tf.data.Dataset.from_generator(generate, output_signature=signature)


@contextlib.contextmanager
def _split_by_keyword():
  """mock_data's ``as_dataset`` takes ``split`` by keyword only; pass a positional one on."""
  mocked = tfds.core.DatasetBuilder.as_dataset

  def as_dataset(self, split=None, **kwargs):
    return mocked(self, split=split, **kwargs)

  with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", as_dataset):
    yield


def test_pipeline_reads_builtin_coco_through_the_adapter(tmp_path):
  names = NAMES[::-1]  # stored class order != ours: the adapter must map by name
  _write_builtin_metadata(tmp_path / "meta", names)

  def expected(classes):
    return multi_hot({NAMES.index(names[c]) for c in classes})

  config = default_data_config(
      name="coco/2014", data_dir=str(tmp_path / "unused"), train_split="train",
      eval_split="validation", test_split="", image_size=32, scale_size=40,
      crop_sizes=(40, 32), cache=False)
  with tfds.testing.mock_data(data_dir=str(tmp_path / "meta"),
                              as_dataset_fn=_builtin_as_dataset), _split_by_keyword():
    meta = pipeline.open_source(config).meta
    assert meta.num_labels == 80 and list(meta.label_names) == NAMES
    assert meta.split_sizes == {"train": 6, "validation": 5}
    batch = next(pipeline.train_dataset(pipeline.open_source(config), batch_size=3, seed=0))
    assert batch["labels"].shape == (3, 80) and batch["image"].shape == (3, 32, 32, 3)
    train_rows = {tuple(expected(c)) for _, c in BUILTIN_TRAIN}
    assert all(tuple(row) in train_rows for row in batch["labels"])
    batches = list(pipeline.eval_dataset(pipeline.open_source(config), "validation", batch_size=4))
  labels = np.concatenate([b["labels"] for b in batches])
  assert labels.shape == (8, 80)
  np.testing.assert_array_equal(labels[:5], np.stack([expected(c) for _, c in BUILTIN_VAL]))
  assert np.concatenate([b["valid"] for b in batches]).tolist() == [True] * 5 + [False] * 3
