"""``ctran_vg500``: a fixture in Visual Genome's layout, hand-computed labels, errors, a tiny run.

The fixture is 11 objects.json entries (three id/name schemas) over 8 JPEGs split between
VG_100K and VG_100K_2, written as the distributed zips and as extracted files.  With the
``test`` config (4 labels, test fraction 0.3) the expected labels, written out by hand:

  name counts (images with the name): tree 5 (1, 3, 6, 7, 2412112), man 3 (1, 2, 6),
  sky 3 (1, 3, 8), cat 2 (5, 8), dog 2 (2, 4; twice in 4, counted once), then 1 each:
  person, trees, t-shirt, big tree, zebra, helmet ("..." normalises to "" and is ignored)
  -> labels tree, man, sky (tie with man: alphabetical), cat (tie with dog: alphabetical).
  Images 4 (dog only), 9 (no objects) and 10 (zebra) have none and are dropped; they have
  no JPEG, which must not matter.
"""

import hashlib
import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import vg500
from ctran_jax import train
from ctran_jax.data import pipeline, vg

LABELS = ["tree", "man", "sky", "cat"]
EXPECTED = {  # image id -> multi-hot over LABELS
    1: [1, 1, 1, 0],
    2: [0, 1, 0, 0],
    3: [1, 0, 1, 0],
    5: [0, 0, 0, 1],
    6: [1, 1, 0, 0],
    7: [1, 0, 0, 0],
    8: [0, 0, 1, 1],
    2412112: [1, 0, 0, 0],
}
# The documented rule, sha256(id)[:8] mod 10000 < 3000, worked out once for these ids.
TEST_IDS = {1, 2, 8}
FOLDER = {i: "VG_100K" for i in (1, 2, 3, 5, 6)} | {i: "VG_100K_2" for i in (7, 8, 2412112)}

ENTRIES = [
    {"image_id": 1, "objects": [
        {"object_id": 11, "names": ["Tree"], "synsets": ["tree.n.01"], "x": 0, "y": 0},
        {"object_id": 12, "names": ["man", "person"]},
        {"object_id": 13, "names": ["  sky "]}],
     "image_url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"},
    {"image_id": 2, "objects": [{"object_id": 21, "names": ["trees."]},
                                {"object_id": 22, "names": ["Man\t"]},
                                {"object_id": 23, "names": ["dog"]}]},
    {"image_id": 3, "objects": [{"object_id": 31, "names": ["tree,"]},
                                {"object_id": 32, "names": ["SKY"]},
                                {"object_id": 33, "names": ["t-shirt"]}]},
    {"id": 4, "objects": [{"id": 41, "name": "Dog"}, {"id": 42, "name": "dog"}]},  # old schema
    {"image": {"image_id": 5, "url": "x/VG_100K/5.jpg"}, "objects": [{"names": ["(Cat)"]}]},
    {"image_id": 6, "objects": [{"names": ["tree"]}, {"names": ["MAN"]},
                                {"names": ["big  Tree"]}]},
    {"image_id": 7, "objects": [{"names": ["Tree"]}, {"names": ["..."]}]},
    {"image_id": 8, "objects": [{"names": ["sky"]}, {"names": ["cat"]}]},
    {"image_id": 9, "objects": []},
    {"image_id": 10, "objects": [{"names": ["zebra"]}]},
    {"image_id": 2412112, "objects": [{"names": ["Tree "]}, {"names": ["helmet"]}]},
]


def jpeg_bytes(image_id: int) -> bytes:
  rng = np.random.default_rng(image_id)
  h, w = 20 + image_id % 7, 24 + image_id % 5
  array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vg_fixture_{os.getpid()}.jpg")
  Image.fromarray(array).save(path, format="JPEG", quality=90)
  with open(path, "rb") as f:
    data = f.read()
  os.remove(path)
  return data


IMAGES = {i: jpeg_bytes(i) for i in FOLDER} | {999: jpeg_bytes(999)}  # 999: not in objects


def write_fixture(root, zipped: bool) -> str:
  """The manual dir: zips as distributed (``zipped``) or objects.json + image folders."""
  os.makedirs(root)
  text = json.dumps(ENTRIES)
  folders = {"VG_100K": "images.zip", "VG_100K_2": "images2.zip"}
  files = {i: FOLDER.get(i, "VG_100K") for i in IMAGES}
  if zipped:
    with zipfile.ZipFile(os.path.join(root, "objects.json.zip"), "w") as zf:
      zf.writestr("objects.json", text)
    for folder, archive in folders.items():
      with zipfile.ZipFile(os.path.join(root, archive), "w") as zf:
        zf.writestr(f"{folder}/", "")
        for i, f in files.items():
          if f == folder:
            zf.writestr(f"{folder}/{i}.jpg", IMAGES[i])
  else:
    with open(os.path.join(root, "objects.json"), "w") as f:
      f.write(text)
    for folder in folders:
      os.makedirs(os.path.join(root, folder))
    for i, folder in files.items():
      with open(os.path.join(root, folder, f"{i}.jpg"), "wb") as f:
        f.write(IMAGES[i])
  return str(root)


def build(manual_dir, data_dir, config="test"):
  builder = tfds.builder(f"ctran_vg500/{config}", data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def records(builder) -> dict:
  out = {}
  for split in builder.info.splits:
    for ex in tfds.as_numpy(builder.as_dataset(split=split, decoders={
        "image": tfds.decode.SkipDecoding()})):
      out[int(ex["image/id"])] = (split, ex["labels"].tolist(), ex["image"],
                                  ex["image/filename"].decode())
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{"zip": (manual_dir, builder), "files": ...}: the fixture prepared from both layouts."""
  root = tmp_path_factory.mktemp("vg")
  out = {}
  for layout in ("zip", "files"):
    manual = write_fixture(root / f"manual_{layout}", zipped=layout == "zip")
    out[layout] = (manual, str(root / f"tfds_{layout}"), build(manual, root / f"tfds_{layout}"))
  return out


# ----------------------------------------------------------------------------- rules


def test_name_normalisation():
  cases = {"Tree": "tree", "  sky ": "sky", "trees.": "trees", "Man\t": "man", "(Cat)": "cat",
           "big  Tree": "big tree", "t-shirt": "t-shirt", "...": "", "A\n B ,": "a b",
           "'tennis racket'": "tennis racket", "": ""}
  for raw, want in cases.items():
    assert vg.normalize_name(raw) == want, raw


def test_split_rule_matches_the_documented_hash():
  for image_id in (1, 2, 3, 8, 2412112, 150, 107899):
    bucket = int(hashlib.sha256(str(image_id).encode()).hexdigest()[:16], 16) % 10000
    assert vg.split_of(image_id, 0.3) == ("test" if bucket < 3000 else "train")
  assert {i for i in EXPECTED if vg.split_of(i, 0.3) == "test"} == TEST_IDS
  fraction = np.mean([vg.split_of(i, 0.0925) == "test" for i in range(1, 20001)])
  assert abs(fraction - 0.0925) < 0.006


# ----------------------------------------------------------------------------- build


@pytest.mark.parametrize("layout", ["zip", "files"])
def test_labels_splits_images_and_metadata(built, layout):
  _, _, builder = built[layout]
  got = records(builder)
  assert set(got) == set(EXPECTED)
  for image_id, labels in EXPECTED.items():
    split, hot, image, filename = got[image_id]
    assert hot == labels, image_id
    assert split == ("test" if image_id in TEST_IDS else "train"), image_id
    assert image == IMAGES[image_id]  # the original JPEG bytes, not re-encoded
    assert filename == f"{FOLDER[image_id]}/{image_id}.jpg"
  meta = builder.info.metadata
  assert meta["label_names"] == LABELS and meta["label_counts"] == [5, 3, 3, 2]
  assert meta["num_images"] == 11 and meta["num_names"] == 11
  assert meta["num_dropped_no_labels"] == 3
  assert meta["objects_file"] == ("objects.json.zip" if layout == "zip" else "objects.json")
  assert builder.info.features["labels"].shape == (4,)
  assert {s: v.num_examples for s, v in builder.info.splits.items()} == {"train": 5, "test": 3}


def test_metadata_survives_reloading(built):
  _, data_dir, _ = built["zip"]
  reloaded = tfds.builder("ctran_vg500/test", data_dir=data_dir)
  assert reloaded.is_prepared()
  assert reloaded.info.metadata["label_names"] == LABELS
  assert reloaded.info.metadata["num_dropped_no_labels"] == 3


def test_zips_and_folders_give_byte_identical_records(built):
  assert records(built["zip"][2]) == records(built["files"][2])
  shards = {}
  for layout in ("zip", "files"):
    directory = built[layout][2].data_dir
    shards[layout] = {name: pathlib.Path(directory, name).read_bytes()
                      for name in sorted(os.listdir(directory)) if ".tfrecord-" in name}
  assert len(shards["zip"]) == 2 and shards["zip"] == shards["files"]


def test_label_count_is_a_config_parameter(built, tmp_path):
  manual = built["files"][0]
  config = vg.CtranVg500Config(name="two", num_labels=2, test_fraction=0.3)
  builder = tfds.builder("ctran_vg500", config=config, data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  assert builder.info.metadata["label_names"] == ["tree", "man"]
  got = {i: hot for i, (_, hot, _, _) in records(builder).items()}
  assert got == {i: EXPECTED[i][:2] for i in (1, 2, 3, 6, 7, 2412112)}  # 5 and 8 dropped
  too_many = vg.CtranVg500Config(name="many", num_labels=12)
  with pytest.raises(ValueError, match="11 distinct object names, fewer than the 12"):
    tfds.builder("ctran_vg500", config=too_many, data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))


# ----------------------------------------------------------------------------- errors


def test_missing_manual_files_are_listed(built, tmp_path):
  assert vg.CtranVg500.missing_manual_files(built["zip"][0]) == []
  assert vg.CtranVg500.missing_manual_files(built["files"][0]) == []
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(built["files"][0], "objects.json"), partial)
  missing = vg.CtranVg500.missing_manual_files(str(partial))
  assert len(missing) == 2
  assert missing[0].startswith("images.zip (or folder VG_100K/): https://")
  assert missing[1].startswith("images2.zip (or folder VG_100K_2/): https://")
  with pytest.raises(FileNotFoundError) as e:
    build(partial, tmp_path / "d1")
  assert str(partial) in str(e.value) and "images.zip" in str(e.value)
  assert "images2.zip" in str(e.value) and "objects.json" not in str(e.value)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="objects.json.zip.*\n.*images.zip"):
    build(empty, tmp_path / "d2")


def test_missing_image_is_named(built, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(built["files"][0], manual)
  os.remove(manual / "VG_100K_2" / "8.jpg")
  with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of objects.json .*: 8\.jpg;"):
    build(manual, tmp_path / "data")


def test_broken_objects_json_names_file_and_line(built, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(built["files"][0], manual)
  with open(manual / "objects.json", "w") as f:
    f.write(json.dumps(ENTRIES[:2], indent=1)[:-40])  # truncated download
  with pytest.raises(ValueError, match=r"objects\.json: line \d+, column \d+: not valid JSON"):
    build(manual, tmp_path / "data")
  with open(manual / "objects.json", "w") as f:
    json.dump([{"objects": [], "url": "x"}], f)
  with pytest.raises(ValueError, match="no integer 'image_id'"):
    build(manual, tmp_path / "data2")


# ----------------------------------------------------------------------------- pipeline + run


def data_config(data_dir):
  c = vg500.get_config().data
  c.name, c.data_dir = "ctran_vg500/test", data_dir
  c.image_size, c.scale_size, c.crop_sizes = 32, 36, (36, 32, 28)
  return c


def test_pipeline_yields_the_labels(built):
  _, data_dir, _ = built["zip"]
  data = data_config(data_dir)
  meta = pipeline.open_source(data).meta
  assert meta.num_labels == 4 and meta.label_names == tuple(LABELS)
  assert meta.split_sizes == {"train": 5, "test": 3}
  batch = next(pipeline.eval_dataset(pipeline.open_source(data), "test", batch_size=4))
  assert batch["valid"].tolist() == [True, True, True, False]
  assert sorted(map(tuple, batch["labels"][:3])) == sorted(tuple(EXPECTED[i]) for i in TEST_IDS)
  train_batch = next(pipeline.train_dataset(pipeline.open_source(data), batch_size=4, seed=0))
  # The recipe resizes on the device: the host ships the decoded crop in a 36^2 canvas.
  assert data.resize_on_device
  assert train_batch["image"].shape == (4, 36, 36, 3) and train_batch["image"].dtype == "uint8"
  assert train_batch["window"].shape == (4, 2) and (train_batch["window"] <= 36).all()
  train_rows = {tuple(v) for i, v in EXPECTED.items() if i not in TEST_IDS}
  assert {tuple(r) for r in train_batch["labels"]} <= train_rows


def test_vg500_config():
  c = vg500.get_config()
  assert (c.data.name, c.data.train_split, c.data.eval_split) == ("ctran_vg500", "train",
                                                                  "test")
  assert c.model.backbone_depth == 101 and c.data.image_size == 576
  assert c.model.use_lmt and c.lmt.max_known_fraction == 0.75
  train.check_config(c)
  train.check_config(vg500.get_config("tiny"))


# One short training run of the VG-500 recipe (tiny backbone), with -m slow.
@pytest.mark.slow  # CI time (the COCO recipe, which VG-500 builds on, trains in test_data_coco)
def test_tiny_training_run(built, tmp_path):
  _, data_dir, _ = built["files"]
  c = vg500.get_config()
  c.data = data_config(data_dir)
  c.model.backbone_depth, c.model.backbone_width = 0, 8
  c.model.backbone_block = "bottleneck"
  c.model.hidden, c.model.layers = 32, 1
  c.optimizer.learning_rate = 1e-4
  c.batch_size, c.mesh.num_devices = 4, 1
  c.num_epochs, c.num_train_steps = 0.0, 3
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 3, 3
  c.eval.batch_size, c.eval.known_fractions = 4, (0.0,)
  result = train.train_and_evaluate(c, str(tmp_path))
  losses = [r["loss"] for r in result["train_log"]]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  report = result["reports"]["test"]
  assert report["num_examples"] == 3 and 0.0 <= report["known"]["0"]["mAP"] <= 1.0
  print(f"vg tiny run: losses {losses}, test mAP {report['known']['0']['mAP']:.3f}")
