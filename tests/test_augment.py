"""The device half of the train transform equals the host transform, pixel for pixel."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import default_data_config

from ctran_jax import augment
from ctran_jax.data import pipeline


@pytest.mark.parametrize("height, width, size", [(37, 50, 24), (20, 13, 32), (32, 32, 32)])
def test_resize_windows_matches_tf_resize_and_flip(height, width, size):
  rng = np.random.default_rng(height)
  canvas = np.zeros((2, 64, 64, 3), np.uint8)
  crop = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  canvas[:, :height, :width] = crop
  out = np.asarray(augment.resize_windows(
      canvas, np.array([[height, width]] * 2), np.array([False, True]), size=size,
      mean=(0.0,) * 3, std=(1 / 255,) * 3))               # normalisation = identity
  expected = tf.image.resize(crop, (size, size)).numpy()
  np.testing.assert_allclose(out[0], expected, atol=2e-3)
  np.testing.assert_allclose(out[1], expected[:, ::-1], atol=2e-3)


def test_device_path_reproduces_the_host_train_batches(demo_data_dir):
  # Stored images are 64^2 = the canvas (scale_size); crops shrink by < 25 %, so the host
  # path does not antialias either.
  base = dict(name="ctran_demo/tiny", data_dir=demo_data_dir, image_size=56, scale_size=64,
              crop_sizes=(64, 56, 48))
  host = next(pipeline.train_dataset(pipeline.open_source(default_data_config(**base)),
                                     batch_size=8, seed=3))
  data = default_data_config(**base, resize_on_device=True)
  split = next(pipeline.train_dataset(pipeline.open_source(data), batch_size=8, seed=3))
  assert split["image"].dtype == np.uint8 and split["image"].shape[1:] == (64, 64, 3)
  np.testing.assert_array_equal(split["labels"], host["labels"])
  images = np.asarray(augment.resize_windows(split["image"], split["window"], split["flip"],
                                             size=56, mean=data.mean, std=data.std))
  np.testing.assert_allclose(images, host["image"], atol=1e-4)
  assert split["flip"].any() and not split["flip"].all()
