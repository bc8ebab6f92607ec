"""ctran_cub: CBM concept selection, the builder on a tiny CUB_200_2011 fixture, the pipeline."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import default_data_config
from PIL import Image

from ctran_jax.data import cub, pipeline

# ------------------------------------------------------------------ select_concepts (pure)


def _votes_table():
  """15 images of 6 classes, 8 attributes; every class's votes are written out by hand."""
  rows = {  # class -> [(is_present of a0..a7, attributes that are absent *and* not visible)]
      0: [("11000111", ()), ("11000100", (6,)), ("10000100", (6,))],
      1: [("10000111", ()), ("10000101", (6,)), ("10000100", (6,))],
      2: [("00100101", ()), ("00000101", ())],
      3: [("00100101", ()), ("00000100", ())],
      4: [("00010100", ()), ("00000100", ()), ("00000100", ())],
      5: [("00010100", ()), ("00010100", ())],
  }
  attributes, classes, certainties = [], [], []
  for label, images in rows.items():
    for bits, hidden in images:
      attributes.append([int(b) for b in bits])
      classes.append(label)
      certainty = np.full(8, 3)
      certainty[list(hidden)] = 1
      certainties.append(certainty)
  order = np.random.default_rng(0).permutation(len(classes))  # order must not matter
  return (np.asarray(attributes)[order], np.asarray(classes)[order],
          np.asarray(certainties)[order])


def test_select_concepts_known_answer():
  attributes, classes, certainties = _votes_table()
  # a0: classes 0,1 (2 -> kept); a1: class 0 only (2 of 3 present -> 1 class, dropped);
  # a2: ties in classes 2 and 3 count as present (kept); a3: class 5 only (class 4 votes
  # 1:2 against); a4: never; a5: all 6; a6: classes 0,1 once their not-visible absent
  # labels are ignored (1:0); a7: classes 1 (2:1), 2 (2:0), 3 (tie 1:1).
  indices, table = cub.select_concepts(attributes, classes, num_classes=6, min_classes=2,
                                       image_certainties=certainties)
  np.testing.assert_array_equal(indices, [0, 2, 5, 6, 7])
  np.testing.assert_array_equal(table, [[1, 0, 1, 1, 0],
                                        [1, 0, 1, 1, 1],
                                        [0, 1, 1, 0, 1],
                                        [0, 1, 1, 0, 1],
                                        [0, 0, 1, 0, 0],
                                        [0, 0, 1, 0, 0]])
  assert table.dtype == np.uint8


def test_select_concepts_without_certainties_and_thresholds():
  attributes, classes, certainties = _votes_table()
  # Without certainties the not-visible absent labels vote, so a6 loses classes 0 and 1.
  indices, _ = cub.select_concepts(attributes, classes, num_classes=6, min_classes=2)
  np.testing.assert_array_equal(indices, [0, 2, 5, 7])
  indices, _ = cub.select_concepts(attributes, classes, 6, 3, certainties)
  np.testing.assert_array_equal(indices, [5, 7])
  indices, _ = cub.select_concepts(attributes, classes, 6, 1, certainties)
  np.testing.assert_array_equal(indices, [0, 1, 2, 3, 5, 6, 7])
  # A class with no voting image ties 0:0 on everything, which counts as present (CBM).
  _, table = cub.select_concepts(attributes, classes, num_classes=7, min_classes=0)
  np.testing.assert_array_equal(table[6], np.ones(8))


def test_select_concepts_rejects_bad_input():
  attributes, classes, _ = _votes_table()
  with pytest.raises(ValueError, match="0 and 1"):
    cub.select_concepts(attributes * 2, classes, 6)
  with pytest.raises(ValueError, match=r"\[0, 5\)"):
    cub.select_concepts(attributes, classes, 5)


def test_cbm_list_and_validation_rule():
  assert len(cub.CBM_CONCEPT_ATTRIBUTES) == 112 == len(set(cub.CBM_CONCEPT_ATTRIBUTES))
  assert max(cub.CBM_CONCEPT_ATTRIBUTES) == 311
  share = np.mean([cub.is_validation(i) for i in range(1, 11789)])
  assert 0.18 < share < 0.22
  assert [i for i in range(1, 17) if cub.is_validation(i)] == [3, 8, 9, 15, 16]


# ------------------------------------------------------------------------ the fixture
# 4 classes x 4 images (ids 4c+1..4c+4 are class c; the last one of each is a test image),
# 312 attributes in 26 groups.  Everything is absent with certainty 3 ("probably") except:
#   attr 0:   present in class 0's training images 1, 2, 3            -> class 0 votes 1
#   attr 1:   class 1: present in 5, absent in 6, absent+not visible in 7 -> tie 1:1 -> 1
#   attr 10:  class 2: present in 9, absent+not visible in 10, 11     -> 1:0 -> 1;
#             present in test image 16 (class 3) only                 -> class 3 votes 0
#   attr 30:  present in test image 4 only                            -> never selected
#   attr 200: present in all training images but 14 (absent+not visible there) -> all 1
#   attr 311: class 3: present in 13, absent (certainty 4) in 14, 15  -> 0
#   attr 5:   not visible in image 3 (not a concept)
# With min_classes=1 the concepts are attributes 0, 1, 10, 200.

NUM_IMAGES = 16
CLASS_NAMES = ["001.Red_bird", "002.Blue_bird", "003.Green_bird", "004.Grey_bird"]
SPECIAL = {  # (image id, attribute index) -> (is_present, certainty)
    (1, 0): (1, 4), (2, 0): (1, 4), (3, 0): (1, 3),
    (5, 1): (1, 4), (6, 1): (0, 3), (7, 1): (0, 1),
    (9, 10): (1, 2), (10, 10): (0, 1), (11, 10): (0, 1), (16, 10): (1, 4),
    (4, 30): (1, 4),
    (13, 311): (1, 3), (14, 311): (0, 4), (15, 311): (0, 4),
    (3, 5): (0, 1),
}
for _i in range(1, NUM_IMAGES + 1):
  if _i % 4:  # training images
    SPECIAL[(_i, 200)] = (0, 1) if _i == 14 else (1, 3)


def attribute_names() -> list[str]:
  names = [f"has_bill_shape::shape{j}" for j in range(9)]
  names += [f"has_wing_color::color{j}" for j in range(15)]
  names += [f"has_g{g:02d}::v{j}" for g in range(24) for j in range(12)]
  assert len(names) == 312
  return names


def image_path(image_id: int) -> str:
  label = (image_id - 1) // 4
  return f"{CLASS_NAMES[label]}/{CLASS_NAMES[label][4:]}_{image_id:04d}.jpg"


def jpeg(image_id: int) -> bytes:
  image = Image.new("RGB", (24 + image_id, 20 + 2 * image_id), (15 * image_id, 90, 200))
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def fixture_files() -> dict[str, bytes]:
  """Archive path -> content, in the layout of CUB_200_2011.tgz."""
  root = "CUB_200_2011/"
  ids = range(1, NUM_IMAGES + 1)
  lines = []
  for i in ids:
    for a in range(312):
      present, certainty = SPECIAL.get((i, a), (0, 3))
      lines.append(f"{i} {a + 1} {present} {certainty} {i + a}.5")
  lines[7] += " 0 extra"  # a few real lines carry extra fields
  files = {
      "attributes.txt": "".join(f"{a + 1} {n}\n" for a, n in enumerate(attribute_names())),
      root + "images.txt": "".join(f"{i} {image_path(i)}\n" for i in ids),
      root + "image_class_labels.txt": "".join(f"{i} {(i - 1) // 4 + 1}\n" for i in ids),
      root + "classes.txt": "".join(f"{c + 1} {n}\n" for c, n in enumerate(CLASS_NAMES)),
      root + "train_test_split.txt": "".join(f"{i} {int(i % 4 != 0)}\n" for i in ids),
      root + "attributes/image_attribute_labels.txt": "\n".join(lines) + "\n",
      root + "attributes/certainties.txt":
          "1 not visible\n2 guessing\n3 probably\n4 definitely\n",
  }
  files = {k: v.encode() for k, v in files.items()}
  files.update({root + "images/" + image_path(i): jpeg(i) for i in ids})
  return files


def write_tgz(path, files: dict[str, bytes]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for name in sorted(files, key=lambda n: (not n.endswith(".jpg"), n)):  # images first
      info = tarfile.TarInfo(name)
      info.size = len(files[name])
      tar.addfile(info, io.BytesIO(files[name]))


def write_folder(manual_dir, files: dict[str, bytes]) -> None:
  for name, data in files.items():
    if name == "attributes.txt":  # the other accepted place
      name = "CUB_200_2011/attributes/attributes.txt"
    path = os.path.join(manual_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)


def build(manual_dir, data_dir, config="tiny"):
  builder = tfds.builder(f"ctran_cub/{config}", data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def examples(builder, split) -> dict[int, dict]:
  ds = builder.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()})
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def tgz_data_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("manual_tgz")
  write_tgz(manual / "CUB_200_2011.tgz", fixture_files())
  data_dir = tmp_path_factory.mktemp("tfds_tgz")
  build(manual, data_dir)
  return str(data_dir)


# Class-level concepts [attr 0, attr 1, attr 10, attr 200] per class, then the one-hot.
CONCEPTS = {0: [1, 0, 0, 1], 1: [0, 1, 0, 1], 2: [0, 0, 1, 1], 3: [0, 0, 0, 1]}


def expected_labels(image_id: int) -> list[int]:
  label = (image_id - 1) // 4
  return CONCEPTS[label] + [int(c == label) for c in range(4)]


def test_builder_from_tgz(tgz_data_dir):
  builder = tfds.builder("ctran_cub/tiny", data_dir=tgz_data_dir)
  splits = {s: examples(builder, s) for s in ("train", "validation", "test")}
  assert sorted(splits["train"]) == [1, 2, 5, 6, 7, 10, 11, 13, 14]
  assert sorted(splits["validation"]) == [3, 9, 15]
  assert sorted(splits["test"]) == [4, 8, 12, 16]
  assert {s: int(builder.info.splits[s].num_examples) for s in splits} == {
      "train": 9, "validation": 3, "test": 4}
  everything = {k: v for split in splits.values() for k, v in split.items()}
  for image_id, ex in everything.items():
    assert ex["labels"].tolist() == expected_labels(image_id), image_id
    assert ex["class_label"] == (image_id - 1) // 4
    assert ex["image"] == jpeg(image_id)  # the original bytes, not re-encoded
    assert ex["image/filename"].decode() == image_path(image_id)
    assert ex["labels"].dtype == np.uint8 and ex["label_visible"].dtype == bool
  # Raw per-image annotations, including ones the class-level labels overrule.
  test_16 = everything[16]
  assert test_16["labels"][2] == 0 and test_16["attribute_labels"][10] == 1
  assert np.flatnonzero(everything[4]["attribute_labels"]).tolist() == [30]
  assert np.flatnonzero(everything[1]["attribute_labels"]).tolist() == [0, 200]
  assert everything[3]["attribute_certainty"][5] == 1
  assert everything[3]["attribute_certainty"][4] == 3
  assert everything[14]["attribute_certainty"][311] == 4
  # Visibility: concept positions follow certainty != 1, class positions are always True.
  assert everything[10]["label_visible"].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
  assert everything[14]["label_visible"].tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
  assert everything[7]["label_visible"].tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
  assert everything[3]["label_visible"].all()  # attr 5 is not a concept


def test_builder_features_and_metadata(tgz_data_dir):
  builder = tfds.builder("ctran_cub/tiny", data_dir=tgz_data_dir)  # restored from disk
  info = builder.info
  assert sorted(info.features) == sorted([
      "image", "labels", "class_label", "attribute_labels", "attribute_certainty",
      "label_visible", "image/id", "image/filename"])
  assert info.features["labels"].shape == (8,)
  assert info.features["attribute_labels"].shape == (312,)
  assert info.features["class_label"].names == CLASS_NAMES
  meta = info.metadata
  assert meta["label_names"] == ["has_bill_shape::shape0", "has_bill_shape::shape1",
                                 "has_wing_color::color1", "has_g14::v8"] + CLASS_NAMES
  assert meta["num_concepts"] == 4 and meta["num_classes"] == 4
  assert meta["concept_attributes"] == [0, 1, 10, 200]
  assert meta["group_names"] == ["has_bill_shape", "has_wing_color", "has_g14"]
  assert meta["concept_groups"] == [0, 0, 1, 2]
  assert meta["num_groups"] == 3 and meta["min_classes"] == 1
  assert meta["attribute_names"] == attribute_names()


def test_folder_gives_the_same_dataset(tgz_data_dir, tmp_path):
  write_folder(tmp_path / "manual", fixture_files())
  assert cub.CtranCub.missing_manual_files(str(tmp_path / "manual")) == []
  builder = build(tmp_path / "manual", tmp_path / "tfds")
  reference = tfds.builder("ctran_cub/tiny", data_dir=tgz_data_dir)
  for split in ("train", "validation", "test"):
    got, want = examples(builder, split), examples(reference, split)
    assert sorted(got) == sorted(want)
    for image_id, ex in got.items():
      for key, value in ex.items():
        np.testing.assert_array_equal(value, want[image_id][key], err_msg=f"{image_id} {key}")
  assert builder.info.metadata["label_names"] == reference.info.metadata["label_names"]


def test_missing_manual_files(tmp_path):
  missing = cub.CtranCub.missing_manual_files(str(tmp_path))
  assert len(missing) == 1 and "CUB_200_2011.tgz" in missing[0] and cub.URL in missing[0]
  files = fixture_files()
  del files["attributes.txt"], files["CUB_200_2011/classes.txt"]
  write_folder(tmp_path, files)
  missing = cub.CtranCub.missing_manual_files(str(tmp_path))
  assert len(missing) == 2
  assert missing[0].startswith("attributes.txt") and "CUB_200_2011/classes.txt" in missing[1]
  with pytest.raises(FileNotFoundError, match="attributes.txt"):
    build(tmp_path, tmp_path / "tfds")
  (tmp_path / "CUB_200_2011.tgz").write_bytes(b"")  # an archive is taken as complete
  assert cub.CtranCub.missing_manual_files(str(tmp_path / "")) == []


def test_empty_manual_dir_is_a_file_not_found_error(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(FileNotFoundError, match="CUB_200_2011.tgz.*data.caltech.edu"):
    build(tmp_path / "manual", tmp_path / "tfds")


@pytest.mark.parametrize("name, line, text, match", [
    ("CUB_200_2011/image_class_labels.txt", 5, "5 two", "image_class_labels.txt, line 5"),
    ("CUB_200_2011/images.txt", 2, "2", "images.txt, line 2"),
    ("CUB_200_2011/attributes/image_attribute_labels.txt", 400, "2 88 0",
     "image_attribute_labels.txt, line 400"),
    ("CUB_200_2011/attributes/image_attribute_labels.txt", 401, "2 89 2 3 1.0",
     "image_attribute_labels.txt, line 401"),
    ("CUB_200_2011/train_test_split.txt", 16, "16 1 x", "train_test_split.txt, line 16"),
])
def test_malformed_lines(tmp_path, name, line, text, match):
  files = fixture_files()
  lines = files[name].decode().splitlines()
  lines[line - 1] = text
  files[name] = ("\n".join(lines) + "\n").encode()
  write_folder(tmp_path / "manual", files)
  with pytest.raises(ValueError, match=match):
    build(tmp_path / "manual", tmp_path / "tfds")


def test_incomplete_attribute_table(tmp_path):
  files = fixture_files()
  name = "CUB_200_2011/attributes/image_attribute_labels.txt"
  files[name] = b"\n".join(files[name].splitlines()[:-1]) + b"\n"  # image 16, attr 312
  write_folder(tmp_path / "manual", files)
  with pytest.raises(ValueError, match="image 16, attribute 312"):
    build(tmp_path / "manual", tmp_path / "tfds")


def test_missing_image(tmp_path):
  files = fixture_files()
  lost = "CUB_200_2011/images/" + image_path(6)
  write_folder(tmp_path / "folder", {k: v for k, v in files.items() if k != lost})
  with pytest.raises(FileNotFoundError, match=image_path(6)):
    build(tmp_path / "folder", tmp_path / "tfds1")
  (tmp_path / "archive").mkdir()
  write_tgz(tmp_path / "archive" / "CUB_200_2011.tgz",
            {k: v for k, v in files.items() if k != lost})
  with pytest.raises(FileNotFoundError, match=image_path(6)):
    build(tmp_path / "archive", tmp_path / "tfds2")


def test_wrong_concept_count_is_reported(tmp_path):
  write_folder(tmp_path / "manual", fixture_files())
  config = cub.CtranCubConfig(name="three", min_classes=1, num_concepts=3, num_classes=4)
  builder = cub.CtranCub(config=config, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"expects 3 concepts .* give 4 .*\[0, 1, 10, 200\]"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))


def test_pipeline_reads_the_labels(tgz_data_dir):
  config = default_data_config(
      name="ctran_cub/tiny", data_dir=tgz_data_dir, train_split="train",
      eval_split="validation", test_split="test", image_size=32, scale_size=40,
      crop_sizes=(40, 32))
  meta = pipeline.open_source(config).meta
  assert meta.num_labels == 8 and meta.label_names[4:] == tuple(CLASS_NAMES)
  batches = list(pipeline.eval_dataset(pipeline.open_source(config), "validation", batch_size=2))
  assert len(batches) == 2
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert images.shape == (4, 32, 32, 3) and valid.tolist() == [True, True, True, False]
  assert sorted(map(tuple, labels[valid].tolist())) == sorted(
      tuple(expected_labels(i)) for i in (3, 9, 15))
  batch = next(pipeline.train_dataset(pipeline.open_source(config), batch_size=3, seed=0))
  assert batch["image"].shape == (3, 32, 32, 3)
  train_rows = {tuple(expected_labels(i)) for i in (1, 2, 5, 6, 7, 10, 11, 13, 14)}
  assert set(map(tuple, batch["labels"].tolist())) <= train_rows


def test_fixed_concept_attributes(tmp_path):
  """The ``cbm`` way: given attribute indices, voted values (attr 311 loses in class 3)."""
  write_folder(tmp_path / "manual", fixture_files())
  config = cub.CtranCubConfig(name="fixed", num_concepts=2, num_classes=4,
                              concept_attributes=(1, 311))
  builder = cub.CtranCub(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  got = {**examples(builder, "train"), **examples(builder, "test")}
  assert got[5]["labels"].tolist() == [1, 0, 0, 1, 0, 0]
  assert got[13]["labels"].tolist() == [0, 0, 0, 0, 0, 1]
  assert got[7]["label_visible"].tolist() == [0, 1, 1, 1, 1, 1]
  assert builder.info.metadata["concept_attributes"] == [1, 311]
  assert builder.info.metadata["group_names"] == ["has_bill_shape", "has_g23"]
