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


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Rounding the host-resized crop of a large image to uint8: half a grey level, normalised.
HALF_GREY = 0.5 / 255 / min(STD)


def device_eval(window, scale, size):
  """`augment.centre_crop_windows` of one `pipeline.ctran_eval_window` output."""
  return np.asarray(augment.centre_crop_windows(
      window["image"].numpy()[None], window["extent"].numpy()[None],
      window["origin"].numpy()[None], scale=scale, size=size, mean=MEAN, std=STD))[0]


@pytest.mark.parametrize("scale, size", [(40, 32), (40, 31), (64, 64), (72, 64)])
@pytest.mark.parametrize("height, width", [(30, 40), (40, 40), (40, 27), (13, 20), (1, 1),
                                           (50, 90), (100, 100)])
@pytest.mark.parametrize("encoding", ["decoded", "jpeg", "png"])
def test_device_eval_transform_reproduces_the_host_centre_crop(scale, size, height, width,
                                                              encoding):
  data = default_data_config(image_size=size, scale_size=scale, crop_sizes=(size,),
                             mean=MEAN, std=STD)
  rng = np.random.default_rng(height * width)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  image = {"decoded": tf.constant(pixels), "jpeg": tf.io.encode_jpeg(pixels, quality=95),
           "png": tf.io.encode_png(pixels)}[encoding]
  decoded = pixels if encoding == "decoded" else tf.io.decode_image(image, channels=3)
  host = pipeline.centre_crop(decoded, data).numpy()
  window = pipeline.ctran_eval_window(image, data)
  side = pipeline.canvas_size(data)
  assert window["image"].dtype == tf.uint8 and window["image"].shape == (side, side, 3)
  fits = height <= scale and width <= scale
  if fits:  # the window of the original image: exact up to float rounding
    assert window["extent"].numpy().tolist() == [height, width]
    np.testing.assert_allclose(device_eval(window, scale, size), host, atol=1e-5)
  else:  # resized on the host, as centre_crop does, then rounded to uint8
    offset = int(round((scale - size) / 2))
    assert window["extent"].numpy().tolist() == [scale, scale]
    assert window["origin"].numpy().tolist() == [offset, offset]
    difference = np.abs(device_eval(window, scale, size) - host).max()
    assert 0 < difference <= HALF_GREY + 1e-5


def test_eval_window_decodes_only_what_the_crop_reads():
  # COCO-like: 480x640 at scale 640, crop 576 samples rows 23..456 and columns 32..608 of
  # the image (bilinear neighbours), shipped with one row/column of margin on each side.
  data = default_data_config(image_size=576, scale_size=640, crop_sizes=(576,))
  jpeg = tf.io.encode_jpeg(np.full((480, 640, 3), 7, np.uint8))
  window = pipeline.ctran_eval_window(jpeg, data)
  assert window["extent"].numpy().tolist() == [480, 640]
  assert window["origin"].numpy().tolist() == [22, 31]
  canvas = window["image"].numpy()
  assert (canvas[:436, :579] == 7).all() and not canvas[436:].any() and not canvas[:, 579:].any()


def test_centre_crop_windows_refuses_a_crop_larger_than_the_scale():
  with pytest.raises(ValueError, match="need 0 < size <= scale"):
    augment.centre_crop_windows(np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 2), np.int32),
                                np.zeros((1, 2), np.int32), scale=8, size=9, mean=MEAN,
                                std=STD)


@pytest.mark.parametrize("scale, size", [(64, 56), (36, 32)])  # 64^2 images: fit; shrunk
def test_device_path_reproduces_the_host_eval_batches(demo_data_dir, scale, size):
  base = dict(name="ctran_demo/tiny", data_dir=demo_data_dir, image_size=size,
              scale_size=scale, crop_sizes=(size,))
  host = list(pipeline.eval_dataset(pipeline.open_source(default_data_config(**base)),
                                    "validation", batch_size=16))
  data = default_data_config(**base, resize_on_device=True)
  split = list(pipeline.eval_dataset(pipeline.open_source(data), "validation", batch_size=16))
  assert len(split) == len(host)
  for a, b in zip(split, host, strict=True):
    assert a["image"].dtype == np.uint8 and a["image"].shape == (16, scale, scale, 3)
    assert a["extent"].shape == a["origin"].shape == (16, 2)
    for key in ("labels", "example_id", "valid"):
      np.testing.assert_array_equal(a[key], b[key])
    images = np.asarray(augment.centre_crop_windows(
        a["image"], a["extent"], a["origin"], scale=scale, size=size, mean=data.mean,
        std=data.std))
    valid = b["valid"].astype(bool)
    np.testing.assert_allclose(images[valid], b["image"][valid],
                               atol=1e-5 if scale == 64 else HALF_GREY + 1e-5)
  assert not split[-1]["valid"].all()  # the padding rows have the same fields
