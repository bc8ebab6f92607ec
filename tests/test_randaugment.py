"""RandAugment and Cutout (`ctran_jax.data.randaugment`): each op against PIL or its
geometry, magnitude 0 as the identity, and in the train pipeline: resume exactness, Cutout's
square, and the config checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import default_data_config
from PIL import Image, ImageEnhance, ImageOps

from ctran_jax.data import randaugment as ra
from ctran_jax.data.pipeline import open_source, train_dataset

TINY = "ctran_demo/tiny"
FILL = (120.0, 115.0, 100.0)


def random_image(seed=0, size=24):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def op(name, image, level, sign=1.0, fill=FILL):
  index = list(ra.OPS).index(name)
  return ra.apply_op(tf.constant(image, tf.float32), index, tf.constant(level, tf.float32),
                     tf.constant(sign, tf.float32), tf.constant(fill, tf.float32)).numpy()


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def config(data_dir, **overrides):
  return default_data_config(name=TINY, data_dir=data_dir, **overrides)


# ------------------------------------------------------------------------------ the ops


@pytest.mark.parametrize("name", list(ra.OPS))
def test_every_op_is_the_identity_at_magnitude_zero(name):
  image = random_image(1).astype(np.float32) * (254.5 / 255) + 0.25  # off the integer grid
  for sign in (-1.0, 1.0):
    np.testing.assert_allclose(op(name, image, 0.0, sign), image, atol=1e-4)


@pytest.mark.parametrize("name,sign,pil,atol", [
    ("autocontrast", 1.0, ImageOps.autocontrast, 1.0),
    ("equalize", 1.0, ImageOps.equalize, 0.0),
    ("solarize", 1.0, lambda im: ImageOps.solarize(im, 0), 0.0),
    ("posterize", 1.0, lambda im: ImageOps.posterize(im, 4), 0.0),
    ("color", -1.0, lambda im: ImageEnhance.Color(im).enhance(0.1), 1.5),  # PIL: uint8 grey
    ("color", 1.0, lambda im: ImageEnhance.Color(im).enhance(1.9), 1.5),
    ("contrast", 1.0, lambda im: ImageEnhance.Contrast(im).enhance(1.9), 2.0),
    ("brightness", -1.0, lambda im: ImageEnhance.Brightness(im).enhance(0.1), 1.0),
    ("sharpness", 1.0, lambda im: ImageEnhance.Sharpness(im).enhance(1.9), 2.0),
])
def test_pixel_ops_at_magnitude_10_are_pils(name, sign, pil, atol):
  image = random_image(2)
  image[:4] = image[:4] // 3 + 40  # a histogram that is not flat; channels differ in range
  expected = np.asarray(pil(Image.fromarray(image)), np.float32)
  np.testing.assert_allclose(op(name, image, 1.0, sign), expected, atol=atol + 1e-3)


def bright_spot(size, y, x):
  image = np.zeros((size, size, 3), np.float32)
  image[y, x] = 255.0
  return image


def brightest(image):
  return np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])


@pytest.mark.parametrize("name,size,sign,source,target", [
    # translate by 0.45 * S = 9 pixels (S = 20): content moves right / down by sign * 9.
    ("translate_x", 20, 1.0, (4, 5), (4, 14)),
    ("translate_x", 20, -1.0, (4, 15), (4, 6)),
    ("translate_y", 20, 1.0, (3, 7), (12, 7)),
    # shear sign * 0.3 about the centre (10, 10) of S = 21: x_out = x_in - s * (y - 10).
    ("shear_x", 21, 1.0, (20, 10), (20, 7)),
    ("shear_y", 21, -1.0, (10, 0), (7, 0)),
])
def test_geometric_ops_move_a_pixel_where_the_formula_says(name, size, sign, source, target):
  out = op(name, bright_spot(size, *source), 1.0, sign, fill=(0.0, 0.0, 0.0))
  assert tuple(brightest(out)) == target
  assert out[target][0] == pytest.approx(255.0, abs=1e-3)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_rotate_turns_about_the_centre_by_30_degrees(sign):
  size, radius = 41, 16
  out = op("rotate", bright_spot(size, 20, 20 + radius), 1.0, sign, fill=(0.0, 0.0, 0.0))
  y, x = brightest(out)
  angle = math.degrees(math.atan2(y - 20, x - 20))
  assert abs(abs(angle) - 30.0) < 3.0 and math.hypot(y - 20, x - 20) == pytest.approx(
      radius, abs=1.0)


def test_geometric_ops_fill_with_the_given_colour():
  out = op("translate_x", np.full((20, 20, 3), 200.0, np.float32), 1.0, 1.0)
  np.testing.assert_allclose(out[:, :9], np.broadcast_to(FILL, (20, 9, 3)), atol=1e-4)
  np.testing.assert_allclose(out[:, 9:], 200.0, atol=1e-4)


def test_randaugment_at_magnitude_zero_returns_the_input():
  image = tf.constant(random_image(3), tf.float32)
  for seed in range(12):  # 12 x 4 draws: every op in all likelihood
    out = ra.randaugment(image, tf.constant([seed, 0], tf.int64), 4, 0.0, FILL)
    np.testing.assert_allclose(out, image, atol=1e-3)


def test_randaugment_draws_per_key():
  image = tf.constant(random_image(4), tf.float32)
  outs = [ra.randaugment(image, tf.constant([seed, 7], tf.int64), 2, 9.0, FILL).numpy()
          for seed in range(6)]
  again = ra.randaugment(image, tf.constant([0, 7], tf.int64), 2, 9.0, FILL).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert len({o.tobytes() for o in outs}) == len(outs)


# ------------------------------------------------------------------------- the pipeline


ON = dict(randaugment_n=2, randaugment_m=9.0, cutout=0.5, cutout_size=0.25)


@pytest.mark.parametrize("transform", ["ctran", "cub"])
def test_augmented_batches_resume_exactly(demo_data_dir, transform):
  cfg = config(demo_data_dir, transform=transform, **ON)
  reference = take(train_dataset(open_source(cfg), batch_size=32, seed=5), 9)
  resumed = take(train_dataset(open_source(cfg), batch_size=32, seed=5, start_step=7), 2)
  for x, y in zip(reference[7:], resumed, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  plain = next(train_dataset(open_source(config(demo_data_dir, transform=transform)),
                             batch_size=32, seed=5))
  np.testing.assert_array_equal(plain["example_id"], reference[0]["example_id"])
  changed = [not np.allclose(a, b, atol=1e-3)
             for a, b in zip(plain["image"], reference[0]["image"], strict=True)]
  assert sum(changed) > 24, "augmented per example"


def test_magnitude_zero_and_cutout_probability_zero_change_nothing(demo_data_dir):
  plain = next(train_dataset(open_source(config(demo_data_dir)), batch_size=32, seed=2))
  off = next(train_dataset(open_source(config(demo_data_dir, randaugment_n=3, randaugment_m=0.0,
                                               cutout=0.0, cutout_size=0.9)),
                           batch_size=32, seed=2))
  np.testing.assert_array_equal(plain["example_id"], off["example_id"])
  np.testing.assert_allclose(off["image"], plain["image"], atol=1e-4)


@pytest.mark.parametrize("transform,cutout_size,side", [("ctran", 0.25, 16), ("ctran", 0.3, 19),
                                                        ("cub", 0.5, 32)])
def test_cutout_erases_one_square_of_the_configured_side(demo_data_dir, transform, cutout_size,
                                                         side):
  plain = next(train_dataset(open_source(config(demo_data_dir, transform=transform)),
                             batch_size=16, seed=4))
  cut = next(train_dataset(open_source(config(demo_data_dir, transform=transform, cutout=1.0,
                                              cutout_size=cutout_size)),
                           batch_size=16, seed=4))
  tops = set()
  for before, after in zip(plain["image"], cut["image"], strict=True):
    erased = np.all(after == 0.0, axis=-1)  # zero: the mean colour, normalised
    rows, cols = np.nonzero(erased)
    assert erased.sum() == side * side
    assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
    np.testing.assert_array_equal(after[~erased], before[~erased])
    tops.add((rows.min(), cols.min()))
  assert len(tops) > 8, "the square moves from example to example"


@pytest.mark.parametrize("overrides,match", [
    (dict(randaugment_n=-1), r"config.data.randaugment_n=-1; expected an integer >= 0"),
    (dict(randaugment_m=12.0), r"config.data.randaugment_m=12.0; expected a value in \[0.0, 10"),
    (dict(cutout=1.5), r"config.data.cutout=1.5; expected a value in \[0.0, 1.0\]"),
    (dict(cutout_size=0.0), r"config.data.cutout_size=0.0; expected a fraction"),
    (dict(resize_on_device=True, cutout=0.5), "need config.data.resize_on_device=False"),
    (dict(resize_on_device=True, randaugment_n=1), "need config.data.resize_on_device=False"),
])
def test_bad_augmentation_configs(demo_data_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    open_source(config(demo_data_dir, **overrides))
