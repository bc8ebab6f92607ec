"""`python -m ctran_jax.data.prepare`: lists what is missing, builds, says how to train on it."""

import subprocess
import sys

import pytest
from test_data_cub import fixture_files, write_tgz

from ctran_jax.data import prepare


def test_missing_files_are_listed_with_exit_status_2(tmp_path, capsys):
  status = prepare.main(["cub", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert status == 2
  assert "CUB_200_2011.tgz" in err and str(tmp_path) in err
  assert "Traceback" not in err


@pytest.mark.parametrize("name, needed", [
    ("coco2014", ["train2014.zip", "val2014.zip", "annotations_trainval2014.zip"]),
    ("vg500", ["objects.json"]),
])
def test_each_dataset_names_its_files(tmp_path, name, needed):
  lines = prepare.missing_files(prepare.builder_name(name), str(tmp_path))
  text = "\n".join(lines)
  for file in needed:
    assert file in text


def test_unknown_dataset_and_missing_manual_dir(tmp_path, capsys):
  assert prepare.main(["imagenet_but_typo", "--data_dir", str(tmp_path)]) == 2
  assert "unknown dataset 'imagenet_but_typo'" in capsys.readouterr().err
  assert prepare.main(["cub", "--data_dir", str(tmp_path)]) == 2
  assert "--manual_dir is required" in capsys.readouterr().err


def test_prepares_from_the_original_archive_and_prints_the_training_flags(tmp_path, capsys):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_tgz(manual / "CUB_200_2011.tgz", fixture_files())
  data_dir = tmp_path / "tfds"
  args = ["cub", "--config", "tiny", "--manual_dir", str(manual), "--data_dir", str(data_dir)]
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert "train 9" in out and "test 4" in out and "validation 3" in out
  assert f"--config.data.name=ctran_cub/tiny --config.data.data_dir={data_dir}" in out
  assert prepare.main(args) == 0                      # second call: nothing to do
  assert "already prepared" in capsys.readouterr().out


def test_list_runs_as_a_module():
  out = subprocess.run([sys.executable, "-m", "ctran_jax.data.prepare", "--list"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  for name in ("coco2014", "cub", "vg500", "folder", "voc", "demo"):
    assert name in out.stdout


def test_prepares_a_folder_dataset_with_builder_options(tmp_path, capsys):
  import tensorflow as tf
  manual = tmp_path / "mine"
  (manual / "images").mkdir(parents=True)
  rows = []
  for i in range(6):
    pixels = tf.cast(tf.fill((8, 8, 3), 30 * i), tf.uint8)
    (manual / "images" / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(pixels).numpy())
    rows.append(f"{i}.jpg,{'cat' if i % 2 else 'dog'};sky,{'train' if i < 4 else 'test'}")
  (manual / "labels.csv").write_text("\n".join(rows) + "\n")
  data_dir = tmp_path / "tfds"
  status = prepare.main(["folder", "--manual_dir", str(manual), "--data_dir", str(data_dir),
                         "--builder_arg", "on_bad_image=skip"])
  out = capsys.readouterr().out
  assert status == 0, out
  assert "ctran_folder: 3 labels; splits: test 2, train 4" in out


def test_folder_labels_problems_are_all_printed(tmp_path, capsys):
  manual = tmp_path / "mine"
  manual.mkdir()
  (manual / "labels.csv").write_text("a.jpg,cat,train\nb.jpg,dog\na.jpg,cat,test\n")
  status = prepare.main(["folder", "--manual_dir", str(manual), "--data_dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  labels = manual / "labels.csv"
  assert f"3 problems in the labels file {labels}:" in err
  for line in (f"{labels}:1: a.jpg: no such image", f"{labels}:2: expected 3 fields",
               f"{labels}:3: duplicate filename 'a.jpg'"):
    assert line in err, line
