"""COCO-1000: the ``ctran_coco1000`` builder (config ``tiny``, 5 words) on a tiny captions
fixture in the original file layout, its word rules, ``prepare coco1000`` and a short
training run of ``configs/coco1000.py`` on the fixture.

The fixture is written here: real zips (``train2014.zip``, ``val2014.zip``,
``annotations_trainval2014.zip``) holding small real JPEGs and ``captions_*2014.json`` in
the real schema.  The expected words, ranking and multi-hot rows are written by hand from
the captions below (not computed with the module's functions).
"""

from __future__ import annotations

import glob
import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data_coco import build as build_coco
from test_data_coco import file_name, jpeg, read_split, write_files

from ctran_jax.data import coco1000, prepare

# image id -> captions, per split (dict order is not id order, as in the real files).
TRAIN = {
    7: ["A dog runs on the grass.", "The dog is running, dog!", "A brown dog on green grass"],
    3: ["Two cats sleep on a red couch.", "A cat and a dog on the couch"],
    12: ["A man's bike next to a red car", "The man rides a bike."],
    5: ["A red bus and a car.", "Cars on the street"],
    9: ["Caf\u00e9 in the city"],
    20: [],                                                    # an image without captions
}
VAL = {  # "tree" is in 3 val images: it would enter the vocabulary if val were counted
    40: ["A RED car parked.", "Red car by the road"],
    41: ["A brown horse by a tree."],
    42: ["Two bikes near a tree."],
    43: ["A dog under a tree.", "Dogs."],
}
SPLITS = {"train2014": TRAIN, "val2014": VAL}

# By hand.  Words of each train image (stop words and one-letter tokens gone, each word
# once however many captions have it):
#   7: dog runs grass running brown green       3: two cats sleep red couch cat dog
#  12: man bike next red car rides              5: red bus car cars street
#   9: cafe city                               20: (none)
# Image counts: red 3 (3, 12, 5); car 2 and dog 2 (tied: alphabetical); the rest 1.
# Counting per caption instead would put dog (4 captions) first; counting stop words would
# put "the" (5 images) and "on" (3) in.
RANKING = [("red", 3), ("car", 2), ("dog", 2)] + [(w, 1) for w in (
    "bike brown bus cafe cars cat cats city couch grass green man next rides running runs "
    "sleep street two").split()]
# Five labels: the cut-off falls inside the 19 words counted once: bike and brown are kept,
# bus (and the rest) dropped, by alphabetical order.
VOCAB = ["red", "car", "dog", "bike", "brown"]
EXPECTED = {  # label indices per image
    "train2014": {7: [2, 4], 3: [0, 2], 12: [0, 1, 3], 5: [0, 1], 9: [], 20: []},
    "val2014": {40: [0, 1], 41: [4], 42: [], 43: [2]},   # "bikes", "dogs": no stemming
}


def multi_hot(indices, num_labels=5) -> np.ndarray:
  row = np.zeros(num_labels, np.uint8)
  row[list(indices)] = 1
  return row


def captions_doc(split: str, images: dict) -> dict:
  """A captions_<split>.json document in the real schema."""
  doc = {"info": {"description": "fixture", "year": 2014}, "licenses": [],
         "images": [], "annotations": []}
  for image_id, captions in images.items():
    doc["images"].append({"id": image_id, "file_name": file_name(split, image_id),
                          "height": 24, "width": 32, "license": 1, "coco_url": "",
                          "flickr_url": "", "date_captured": "2013-11-14 16:28:13"})
    for caption in captions:
      doc["annotations"].append({"image_id": image_id, "id": 100 * image_id + len(
          doc["annotations"]), "caption": caption})
  doc["annotations"].reverse()
  return doc


def write_fixture(root, *, layout="zip", docs=None) -> dict:
  """The original COCO-2014 files under ``root``; returns {(split, id): jpeg bytes}."""
  os.makedirs(root, exist_ok=True)
  jpegs = {(split, i): jpeg(i, 24, 32, False) for split, images in SPLITS.items()
           for i in images}
  docs = docs or {f"annotations/captions_{split}.json": json.dumps(captions_doc(split, images))
                  for split, images in SPLITS.items()}
  write_files(root, layout, jpegs, docs, other=("captions_", "instances_"))
  return jpegs


def build(manual_dir, data_dir, name="ctran_coco1000/tiny") -> tfds.core.DatasetBuilder:
  return build_coco(manual_dir, data_dir, name)


@pytest.fixture(scope="module")
def coco1000_zip(tmp_path_factory):
  """(manual_dir, data_dir, jpegs, builder) of the fixture built from the zips."""
  root = tmp_path_factory.mktemp("coco1000")
  jpegs = write_fixture(root / "manual")
  builder = build(root / "manual", root / "tfds")
  return root / "manual", str(root / "tfds"), jpegs, builder


# ---------------------------------------------------------------------------- words


@pytest.mark.parametrize("caption, words", [
    ("A man's T-shirt, 2 dogs & a Caf\u00e9!", ["man", "shirt", "dogs", "cafe"]),
    ("Don't SIT there; it's a trash can.", ["sit", "trash", "can"]),
    ("jalape\u00f1o\u2014pizza  on_the   TABLE", ["jalapeno", "pizza", "table"]),
    ("Two people are standing next to the bus", ["two", "people", "standing", "next", "bus"]),
    ("I see a b c", ["see"]),
    ("", []),
])
def test_caption_words(caption, words):
  assert coco1000.caption_words(caption) == words


def test_stop_words_are_a_fixed_lower_case_list():
  assert {"the", "on", "and", "is", "of", "with", "near", "don", "isn"} <= coco1000.STOP_WORDS
  assert not {"can", "two", "next", "top", "front", "red", "man"} & coco1000.STOP_WORDS
  assert all(w.isalpha() and w.islower() and len(w) > 1 for w in coco1000.STOP_WORDS)


def test_ranking_counts_images_and_breaks_ties_alphabetically():
  assert coco1000.rank_words([frozenset("bca"), frozenset("b"), frozenset("cb")]) == [
      ("b", 3), ("c", 2), ("a", 1)]
  assert coco1000.rank_words([frozenset({"zebra", "apple"}), frozenset({"mango"})]) == [
      ("apple", 1), ("mango", 1), ("zebra", 1)]
  parsed = coco1000.parse_captions(json.dumps(captions_doc("train2014", TRAIN)).encode(), "t")
  assert [image_id for image_id, _, _ in parsed] == [3, 5, 7, 9, 12, 20]
  assert dict((i, w) for i, _, w in parsed)[7] == {
      "dog", "runs", "grass", "running", "brown", "green"}
  assert coco1000.rank_words(w for _, _, w in parsed) == RANKING


# ---------------------------------------------------------------------------- builder


def test_builder_vocabulary_labels_and_metadata(coco1000_zip):
  _, _, jpegs, builder = coco1000_zip
  info = builder.info
  assert builder.name == "ctran_coco1000" and builder.builder_config.name == "tiny"
  assert {k: v.num_examples for k, v in info.splits.items()} == {"train2014": 6, "val2014": 4}
  assert info.metadata["label_names"] == VOCAB
  assert info.metadata["label_counts"] == [3, 2, 2, 1, 1]
  assert info.metadata["num_words"] == len(RANKING) == 22
  assert info.metadata["vocabulary_split"] == "train2014"
  assert info.metadata["unlabelled_images"] == {"train2014": 2, "val2014": 1}
  for split, expected in EXPECTED.items():
    examples = read_split(builder, split)
    assert sorted(int(ex["image/id"]) for ex in examples) == sorted(expected)
    for ex in examples:
      image_id = int(ex["image/id"])
      assert ex["labels"].dtype == np.uint8 and ex["labels"].shape == (5,)
      np.testing.assert_array_equal(ex["labels"], multi_hot(expected[image_id]),
                                    err_msg=f"{split} image {image_id}")
      assert ex["image/filename"].decode() == file_name(split, image_id)
      assert ex["image"] == jpegs[split, image_id]


def test_metadata_survives_reloading(coco1000_zip):
  _, data_dir, _, _ = coco1000_zip
  info = tfds.builder("ctran_coco1000/tiny", data_dir=data_dir).info
  assert info.metadata["label_names"] == VOCAB
  assert info.metadata["unlabelled_images"] == {"train2014": 2, "val2014": 1}


def test_extracted_folders_give_a_byte_identical_dataset(coco1000_zip, tmp_path):
  _, zip_data_dir, _, _ = coco1000_zip
  write_fixture(tmp_path / "manual", layout="folders")
  build(tmp_path / "manual", tmp_path / "tfds")
  records = sorted(glob.glob(os.path.join(zip_data_dir, "ctran_coco1000", "tiny", "*",
                                          "*.tfrecord*")))
  assert len(records) == 2
  for path in records:
    twin = os.path.join(str(tmp_path / "tfds"), os.path.relpath(path, zip_data_dir))
    with open(path, "rb") as a, open(twin, "rb") as b:
      assert a.read() == b.read(), os.path.basename(path)


def test_default_config_has_1000_labels_and_needs_1000_words(coco1000_zip, tmp_path):
  manual, _, _, _ = coco1000_zip
  builder = tfds.builder("ctran_coco1000", data_dir=str(tmp_path))
  assert builder.builder_config.name == "default"
  assert builder.info.features["labels"].shape == (1000,)
  with pytest.raises(ValueError, match="captions_train2014.json has 22 distinct words, fewer "
                     "than the 1000 labels"):
    build(manual, tmp_path, name="ctran_coco1000")


def test_missing_files_are_listed_exactly(tmp_path):
  full = tmp_path / "full"
  write_fixture(full)
  assert coco1000.CtranCoco1000.missing_manual_files(str(full)) == []

  partial = tmp_path / "partial"  # val images (zip) + val captions (extracted) only
  os.makedirs(partial / "annotations")
  os.rename(full / "val2014.zip", partial / "val2014.zip")
  with zipfile.ZipFile(full / "annotations_trainval2014.zip") as z:
    z.extract("annotations/captions_val2014.json", partial)
    z.extract("annotations/instances_train2014.json", partial)  # instances are not captions
  missing = coco1000.CtranCoco1000.missing_manual_files(str(partial))
  assert missing == [
      "train2014.zip (or folder train2014/): http://images.cocodataset.org/zips/train2014.zip",
      "annotations_trainval2014.zip (or annotations/captions_train2014.json): "
      "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"]
  with pytest.raises(FileNotFoundError) as error:
    build(partial, tmp_path / "tfds")
  message = str(error.value)
  assert missing[0] in message and missing[1] in message and str(partial) in message
  assert "val2014.zip (or folder val2014/)" not in message


@pytest.mark.parametrize("member, text, match", [
    ("captions_val2014", {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
      "categories": []}, "without 'image_id' and 'caption'.*captions_\\*2014.json"),
    ("captions_val2014", {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [
        {"id": 5, "image_id": 2, "caption": "a dog"}]}, "caption 5 refers to image id 2"),
    ("captions_train2014", "{not json", "not valid JSON"),
])
def test_bad_captions_files_are_named(tmp_path, member, text, match):
  docs = {f"annotations/captions_{s}.json": json.dumps(captions_doc(s, images))
          for s, images in SPLITS.items()}
  docs[f"annotations/{member}.json"] = text if isinstance(text, str) else json.dumps(text)
  write_fixture(tmp_path / "manual", docs=docs)
  with pytest.raises(ValueError, match=match) as error:
    build(tmp_path / "manual", tmp_path / "tfds")
  assert f"annotations_trainval2014.zip: annotations/{member}.json" in str(error.value)


# ---------------------------------------------------------------------------- prepare


def test_prepare_lists_and_builds_coco1000(tmp_path, capsys):
  assert prepare.main(["--list"]) == 0
  line = next(row for row in capsys.readouterr().out.splitlines()
              if row.startswith("coco1000 "))
  for needed in ("ctran_coco1000", "train2014.zip", "val2014.zip",
                 "annotations_trainval2014.zip", "captions_train2014.json"):
    assert needed in line

  assert prepare.main(["coco1000", "--manual_dir", str(tmp_path), "--data_dir",
                       str(tmp_path / "tfds")]) == 2
  assert "annotations_trainval2014.zip (or annotations/captions_train2014.json and " \
         "annotations/captions_val2014.json)" in capsys.readouterr().err

  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  write_fixture(manual)
  assert prepare.main(["coco1000", "--config", "tiny", "--manual_dir", str(manual),
                       "--data_dir", str(data_dir)]) == 0
  out = capsys.readouterr().out
  assert "ctran_coco1000/tiny: 5 labels; splits: train2014 6, val2014 4" in out
  assert f"--config.data.name=ctran_coco1000/tiny --config.data.data_dir={data_dir}" in out


# ---------------------------------------------------------------------------- training


@pytest.mark.slow  # CI time (the COCO recipe trains in test_data_coco); run with -m slow
def test_coco1000_recipe_trains_and_evaluates_partial_labels(coco1000_zip, tmp_path):
  from configs import coco1000 as coco1000_config
  from ctran_jax import train

  _, data_dir, _, _ = coco1000_zip
  c = coco1000_config.get_config()
  assert c.data.name == "ctran_coco1000" and c.data.train_split == "train2014"
  assert tuple(c.eval.known_fractions) == (0.0, 0.25, 0.5, 0.75)
  c.data.name = "ctran_coco1000/tiny"
  c.data.data_dir = data_dir
  c.data.image_size, c.data.scale_size, c.data.crop_sizes = 32, 40, (40, 32)
  c.model.backbone_depth, c.model.backbone_width = 0, 8
  c.model.hidden, c.model.layers = 32, 1
  c.batch_size, c.eval.batch_size = 3, 4
  c.num_train_steps, c.num_epochs = 2, 0.0
  c.log_every_steps = 1
  c.eval_every_steps = 100          # evaluate once, at the end
  c.mesh.num_devices = 1
  result = train.train_and_evaluate(c, str(tmp_path))
  losses = [r["loss"] for r in result["train_log"]]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  report = result["reports"]["val2014"]
  assert report["num_examples"] == 4
  assert set(report["known"]) == {"0", "25", "50", "75"}
  assert all(np.isfinite(r["loss"]) for r in report["known"].values())
  assert 0.0 <= report["known"]["0"]["mAP"] <= 1.0
