"""The ``ctran_folder`` builder: labels files, label lists, splits, bad input, training on it.

Every fixture is a folder under tmp_path with real JPEG/PNG files written by TF's encoders;
expected multi-hots and splits are written by hand (or, for the hash split, recomputed here
from the documented rule).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import default_data_config

from ctran_jax.data import folder
from ctran_jax.data.pipeline import open_source

NAME = "ctran_folder"


def pixels(seed: int, height: int = 20, width: int = 24) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg(seed: int) -> bytes:
  return tf.io.encode_jpeg(pixels(seed)).numpy()


def png(seed: int) -> bytes:
  return tf.io.encode_png(pixels(seed)).numpy()


def make_folder(root, images: dict[str, bytes], files: dict[str, str]) -> str:
  """Writes images (paths relative to root) and text files; returns root as a string."""
  for name, data in {**images, **{k: v.encode() for k, v in files.items()}}.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return str(root)


def prepare(manual_dir, data_dir, **options) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(NAME, data_dir=str(data_dir), manual_dir=manual_dir, **options)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def read_back(data_dir) -> dict[str, tuple[str, list[int], bytes]]:
  """filename -> (split, labels, stored image bytes), via the name and data_dir alone."""
  builder = tfds.builder(NAME, data_dir=str(data_dir))
  out = {}
  for split in builder.info.splits:
    ds = builder.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()})
    for ex in tfds.as_numpy(ds):
      out[ex["image/filename"].decode()] = (split, ex["labels"].tolist(), ex["image"])
  return out


def expected_hash_split(filename, validation, test):
  u = int(hashlib.sha256(filename.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64
  return "test" if u < test else "validation" if u < test + validation else "train"


# Five images with a split column; JPEGs (one in a sub-folder) and PNGs under images/.
CSV_IMAGES = {"images/a.jpg": jpeg(1), "images/b.png": png(2), "images/sub/c.jpg": jpeg(3),
              "images/d.jpg": jpeg(4), "images/e, f.png": png(5)}
CSV_TEXT = """filename,labels,split
a.jpg,cat;dog,train
b.png, dog ,train

sub/c.jpg,,validation
d.jpg,bird;cat,test
"e, f.png",bird,train
"""


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory):
  manual = make_folder(tmp_path_factory.mktemp("csv"), CSV_IMAGES, {"labels.csv": CSV_TEXT})
  data_dir = tmp_path_factory.mktemp("csv_data")
  prepare(manual, data_dir)
  return manual, str(data_dir)


def test_csv_with_split_column(csv_dataset):
  manual, data_dir = csv_dataset
  builder = tfds.builder(NAME, data_dir=data_dir)  # no options: the stored info decides
  assert builder.info.features["labels"].shape == (3,)
  metadata = dict(builder.info.metadata.items())
  assert metadata["label_names"] == ["bird", "cat", "dog"]
  got = read_back(data_dir)
  assert {k: v[:2] for k, v in got.items()} == {
      "a.jpg": ("train", [0, 1, 1]), "b.png": ("train", [0, 0, 1]),
      "sub/c.jpg": ("validation", [0, 0, 0]), "d.jpg": ("test", [1, 1, 0]),
      "e, f.png": ("train", [1, 0, 0])}
  for name, (_, _, stored) in got.items():  # JPEG and PNG are stored byte for byte
    assert stored == CSV_IMAGES["images/" + name], name
  assert metadata["label_counts"] == [2, 2, 2]
  assert metadata["images_without_labels"] == 1
  assert metadata["skipped_images"] == 0 and metadata["reencoded_images"] == 0
  assert metadata["split_rule"] == "column"
  meta = open_source(default_data_config(name=NAME, data_dir=data_dir)).meta
  assert meta.label_names == ("bird", "cat", "dog")
  assert meta.split_sizes == {"train": 3, "validation": 1, "test": 1}


def test_builder_from_directory_reads_it_without_this_module(csv_dataset):
  _, data_dir = csv_dataset
  builder = tfds.builder_from_directory(os.path.join(data_dir, NAME, "1.0.0"))
  assert builder.info.features["labels"].shape == (3,)
  ex = next(iter(tfds.as_numpy(builder.as_dataset("test"))))
  assert ex["image/filename"] == b"d.jpg" and ex["labels"].tolist() == [1, 1, 0]
  expected = tf.io.decode_jpeg(CSV_IMAGES["images/d.jpg"]).numpy()
  np.testing.assert_array_equal(ex["image"], expected)


def test_two_builds_are_byte_identical(csv_dataset, tmp_path):
  manual, data_dir = csv_dataset
  prepare(manual, tmp_path)
  first = sorted(glob.glob(os.path.join(data_dir, NAME, "1.0.0", "*.tfrecord*")))
  second = sorted(glob.glob(os.path.join(str(tmp_path), NAME, "1.0.0", "*.tfrecord*")))
  assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
  assert len(first) == 3
  for a, b in zip(first, second, strict=True):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read(), a


def test_jsonl_label_list_and_hash_split(tmp_path):
  names = [f"img_{i:02d}.png" for i in range(12)]
  labels = {n: [["dog"], ["cat", "zebra"], []][i % 3] for i, n in enumerate(names)}
  lines = [json.dumps({"filename": n, "labels": labels[n], "note": "ignored"}) for n in names]
  manual = make_folder(tmp_path / "m", {n: png(i) for i, n in enumerate(names)},
                       {"labels.jsonl": "\n".join(lines) + "\n",
                        "label_names.txt": "zebra\ncat\n\ndog\nunused\n"})
  prepare(manual, tmp_path / "d", validation_fraction=0.3, test_fraction=0.3)
  got = read_back(tmp_path / "d")
  multi_hot = {("dog",): [0, 0, 1, 0], ("cat", "zebra"): [1, 1, 0, 0], (): [0, 0, 0, 0]}
  for n in names:
    split, hot, _ = got[n]
    assert hot == multi_hot[tuple(labels[n])], n
    assert split == expected_hash_split(n, 0.3, 0.3), n
  assert {s for s, _, _ in got.values()} == {"train", "validation", "test"}
  metadata = dict(tfds.builder(NAME, data_dir=str(tmp_path / "d")).info.metadata.items())
  assert metadata["label_names"] == ["zebra", "cat", "dog", "unused"]
  assert metadata["label_counts"] == [4, 4, 4, 0]
  assert metadata["split_rule"] == "hash"


def test_csv_without_header_is_positional(tmp_path):
  path = tmp_path / "l.csv"
  path.write_text("x/a.jpg,b;a\n./c.jpg,\n\n")
  rows = folder.read_rows(str(path))
  assert [(r.filename, r.labels, r.split, r.line) for r in rows] == [
      ("x/a.jpg", ("b", "a"), None, 1), ("c.jpg", (), None, 2)]


def test_other_formats_are_stored_as_png(tmp_path):
  image = pytest.importorskip("PIL.Image")
  path = tmp_path / "m" / "g.bmp"
  path.parent.mkdir()
  image.fromarray(pixels(7)).save(path, "BMP")
  manual = make_folder(tmp_path / "m", {}, {"labels.csv": "g.bmp,cat,train\n"})
  prepare(manual, tmp_path / "d")
  (_, hot, stored), = read_back(tmp_path / "d").values()
  assert hot == [1] and stored.startswith(b"\x89PNG")
  np.testing.assert_array_equal(tf.io.decode_png(stored).numpy(), pixels(7))


# ------------------------------------------------------------------------------- errors


def builder_error(manual, tmp_path, error=ValueError, **options):
  with pytest.raises(error) as e:
    prepare(manual, tmp_path / "d", **options)
  return str(e.value)


def test_unknown_label_names_file_and_line(tmp_path):
  manual = make_folder(tmp_path / "m", {"a.jpg": jpeg(1), "b.jpg": jpeg(2)},
                       {"labels.csv": "filename,labels\na.jpg,cat\nb.jpg,cat;kat\n",
                        "names.txt": "cat\ndog\n"})
  message = builder_error(manual, tmp_path, label_list="names.txt")
  assert os.path.join(manual, "labels.csv") + ":3" in message and "'kat'" in message


@pytest.mark.parametrize("name,text,line", [
    ("labels.csv", "filename,labels\na.jpg,cat\na.jpg,dog,train,x\n", 3),
    ("labels.csv", "a.jpg,cat,train\nb.jpg,dog\n", 2),
    ("labels.csv", "filename,label\na.jpg,cat\n", 1),
    ("labels.jsonl", '{"filename": "a.jpg", "labels": ["cat"]}\n{"filename": "b.jpg",\n', 2),
    ("labels.jsonl", '{"filename": "a.jpg", "labels": "cat"}\n', 1),
    ("labels.csv", "a.jpg,cat\n../b.jpg,dog\n", 2),
    ("labels.csv", "a.jpg,cat,train\nb.jpg,dog,all\n", 2),
])
def test_malformed_line_names_file_and_line(tmp_path, name, text, line):
  manual = make_folder(tmp_path / "m", {"a.jpg": jpeg(1)}, {name: text})
  assert f"{os.path.join(manual, name)}:{line}:" in builder_error(manual, tmp_path)


def test_duplicate_filename_names_both_lines(tmp_path):
  manual = make_folder(tmp_path / "m", {"a.jpg": jpeg(1)},
                       {"labels.csv": "a.jpg,cat\nb.jpg,dog\n./a.jpg,dog\n"})
  message = builder_error(manual, tmp_path)
  assert "labels.csv:3" in message and "'a.jpg'" in message and "line 1" in message


def test_every_problem_of_the_labels_file_in_one_error(tmp_path):
  manual = make_folder(tmp_path / "m", {"a.jpg": jpeg(1), "b.jpg": jpeg(2), "d.jpg": jpeg(4)}, {
      "labels.csv": "filename,labels,split\n"
                    "a.jpg,cat,train\n"
                    "b.jpg,cat;kat,train\n"   # 3: unknown label
                    "c.jpg,dog\n"             # 4: one field short
                    "a.jpg,dog,train\n"       # 5: duplicate filename
                    "d.jpg,dog,all\n"         # 6: not a split name
                    "../e.jpg,cat,test\n"     # 7: outside the images folder
                    "f.jpg,cat,test\n",       # 8: no such image
      "label_names.txt": "cat\ndog\ncat\n"})  # 3: listed twice
  message = builder_error(manual, tmp_path)
  labels, names = os.path.join(manual, "labels.csv"), os.path.join(manual, "label_names.txt")
  header = f"7 problems in the labels file {labels} and the label list {names}:"
  assert f"{header}\n" in message  # TFDS may put its own words before it
  expected = [f"{labels}:3: unknown label 'kat'", f"{labels}:4: expected 3 fields",
              f"{labels}:5: duplicate filename 'a.jpg' (first at line 2)",
              f"{labels}:6: split 'all' is not a split name",
              f"{labels}:7: filename '../e.jpg' must be relative",
              f"{labels}:8: f.jpg: no such image in {manual}",
              f"{names}:3: label 'cat' listed twice (first at line 1)"]
  for problem in expected:
    assert f"\n  {problem}" in message, problem
  lines = message.splitlines()
  start = next(i for i, line in enumerate(lines) if line.endswith(header))
  assert [line.split(": ")[0] for line in lines[start + 1:start + 8]] == [
      f"  {labels}:{n}" for n in range(3, 9)] + [f"  {names}:3"]


def test_a_long_list_of_problems_is_cut(tmp_path):
  path = tmp_path / "labels.jsonl"
  path.write_text("".join(f'{{"filename": "{i}.jpg", "labels": "x"}}\n' for i in range(60)))
  with pytest.raises(ValueError) as e:
    folder.read_rows(str(path))
  message = str(e.value)
  assert message.startswith(f"60 problems in the labels file {path}:")
  assert f"{path}:50: 'labels'" in message and f"{path}:51:" not in message
  assert "\n  ... and 10 more\n" in message


def test_missing_image_names_file_and_line(tmp_path):
  manual = make_folder(tmp_path / "m", {"images/a.jpg": jpeg(1)},
                       {"labels.csv": "a.jpg,cat\nnope.jpg,dog\n"})
  message = builder_error(manual, tmp_path, FileNotFoundError)
  assert "labels.csv:2: nope.jpg" in message and os.path.join(manual, "images") in message


def test_missing_labels_file(tmp_path):
  manual = make_folder(tmp_path / "m", {"a.jpg": jpeg(1)}, {})
  assert "labels.csv (or labels.jsonl)" in builder_error(manual, tmp_path, FileNotFoundError)
  assert folder.CtranFolder.missing_manual_files(manual)
  (tmp_path / "m" / "labels.jsonl").write_text("")
  assert folder.CtranFolder.missing_manual_files(manual) == []


@pytest.fixture
def folder_with_bad_images(tmp_path):
  good = jpeg(1)
  return make_folder(tmp_path / "m", {
      "good.jpg": good, "cut.jpg": good[:len(good) // 2], "text.png": b"not an image"},
      {"labels.csv": "good.jpg,cat,train\ncut.jpg,dog,train\ntext.png,cat,train\n"})


def test_corrupt_image_fails_naming_file_and_line(folder_with_bad_images, tmp_path):
  message = builder_error(folder_with_bad_images, tmp_path)
  assert message.startswith("2 image(s) cannot be decoded")
  assert os.path.join(folder_with_bad_images, "cut.jpg") in message and "labels.csv:2" in message
  assert "text.png" in message and "labels.csv:3" in message


def test_corrupt_image_skipped_and_counted(folder_with_bad_images, tmp_path):
  prepare(folder_with_bad_images, tmp_path / "d", on_bad_image="skip")
  got = read_back(tmp_path / "d")
  assert {k: v[:2] for k, v in got.items()} == {"good.jpg": ("train", [1, 0])}
  metadata = dict(tfds.builder(NAME, data_dir=str(tmp_path / "d")).info.metadata.items())
  assert metadata["skipped_images"] == 2
  assert metadata["skipped_files"] == ["cut.jpg", "text.png"]
  assert metadata["label_counts"] == [1, 0]


def test_pickled_builder_keeps_its_options(csv_dataset, tmp_path):
  """TFDS pickles builders to hand them to workers; ours must come back with its options."""
  manual, _ = csv_dataset
  builder = tfds.builder(NAME, data_dir=str(tmp_path), manual_dir=manual, on_bad_image="skip",
                         test_fraction=0.3)
  clone = pickle.loads(pickle.dumps(builder))
  assert clone.info.metadata["options"] == builder.info.metadata["options"]
  assert clone.info.metadata["options"]["test_fraction"] == 0.3
  assert clone.info.metadata["fingerprint"] == builder.info.metadata["fingerprint"]


def test_options_and_folder_mismatches_are_refused(csv_dataset, tmp_path):
  manual, _ = csv_dataset
  with pytest.raises(ValueError, match="on_bad_image"):
    tfds.builder(NAME, data_dir=str(tmp_path), manual_dir=manual, on_bad_image="ignore")
  with pytest.raises(ValueError, match="sum < 1"):
    tfds.builder(NAME, data_dir=str(tmp_path), manual_dir=manual, test_fraction=0.9,
                 validation_fraction=0.2)
  # The folder only in the DownloadConfig: the features were fixed without it.
  with pytest.raises(ValueError, match="manual_dir="):
    tfds.builder(NAME, data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  # Same folder and options again: reused.  Other options: refused, unless rebuilding.
  prepare(manual, tmp_path)
  prepare(manual, tmp_path, labels_file="labels.csv")  # the default, named: same data
  with pytest.raises(ValueError, match="already holds"):
    prepare(manual, tmp_path, on_bad_image="skip")
  tfds.builder(NAME, data_dir=str(tmp_path), manual_dir=manual,
               on_bad_image="skip").download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  metadata = dict(tfds.builder(NAME, data_dir=str(tmp_path)).info.metadata.items())
  assert metadata["options"]["on_bad_image"] == "skip"


def test_default_manual_dir_needs_no_options(tmp_path):
  """Files in <data_dir>/downloads/manual: what data.prepare=True in training relies on."""
  make_folder(tmp_path / "downloads" / "manual", {"a.png": png(1)},
              {"labels.csv": "a.png,x;y,train\n"})
  builder = tfds.builder(NAME, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert read_back(tmp_path) == {"a.png": ("train", [1, 1], png(1))}


# ------------------------------------------------------------------------------ training


def test_tiny_training_run_on_a_folder(tmp_path):
  from configs import folder as folder_config
  from ctran_jax import train

  names = [f"{i:02d}.jpg" if i % 2 else f"{i:02d}.png" for i in range(16)]
  label_sets = ["red", "red;blue", "blue", ""]
  splits = ["train"] * 8 + ["validation"] * 4 + ["test"] * 4
  images = {n: (jpeg(i) if n.endswith(".jpg") else png(i)) for i, n in enumerate(names)}
  rows = [f"{n},{label_sets[i % 4]},{s}" for i, (n, s) in enumerate(zip(names, splits,
                                                                          strict=True))]
  manual = make_folder(tmp_path / "m", images, {"labels.csv": "\n".join(rows) + "\n"})
  prepare(manual, tmp_path / "d")
  config = folder_config.get_config("tiny")
  config.data.data_dir = str(tmp_path / "d")
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [r["loss"] for r in result["train_log"]]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  with open(tmp_path / "run" / "eval" / "results.json") as f:
    doc = json.load(f)
  assert doc["num_labels"] == 2 and doc["label_names"] == ["blue", "red"]
  assert doc["splits"]["test"]["num_examples"] == 4
  for split in ("validation", "test"):
    m_ap = result["reports"][split]["known"]["0"]["mAP"]
    assert 0.0 <= m_ap <= 1.0, (split, m_ap)
