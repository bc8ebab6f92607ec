"""The README's `python -m ctran_jax.data.demo_images` command writes the dataset's pixels."""

import os
import subprocess
import sys
import zlib

import numpy as np
from helpers import REPO
from PIL import Image

from ctran_jax.data import demo


def test_the_command_writes_the_demo_test_images(tmp_path):
  out = tmp_path / "images"
  done = subprocess.run([sys.executable, "-m", "ctran_jax.data.demo_images", f"--out={out}",
                         "--count=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["test_0000.png", "test_0001.png"]
  config = next(b for b in demo.CtranDemo.BUILDER_CONFIGS if b.name == "default")
  for index in range(2):
    rng = np.random.default_rng([config.seed, zlib.crc32(b"test"), index])
    expected = demo.render_example(rng, config.image_size)
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"test_{index:04d}.png")),
                                  expected["image"])
    names = ", ".join(demo.LABEL_NAMES[i] for i in np.flatnonzero(expected["labels"]))
    assert f"test_{index:04d}.png  (true labels: {names or 'none'})" in done.stdout


def test_a_bad_count_is_a_clear_error(tmp_path):
  done = subprocess.run([sys.executable, "-m", "ctran_jax.data.demo_images",
                         f"--out={tmp_path}", "--count=0"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 2 and "--count must be at least 1" in done.stderr
