"""RandAugment and Cutout for the train transforms, as stateless TF ops keyed per example.

Both are off by default (the reference recipe has neither). The train transforms
(`pipeline.TRANSFORMS`, "ctran" and "cub") call `augment_pixels` on the resized, mirrored
image (float32 (S, S, 3), pixel values in [0, 255]) and `cutout` on the normalised one.
Every random choice comes from the example's stateless key (folded with a constant per
augmentation, so the crop and flip draws are those of a run without them): an example's
augmentation depends only on (seed, process, epoch, position in epoch), like its crop, and a
resumed run sees the same pixels. The device path (``data.resize_on_device``) has neither:
`check` refuses the combination.

**RandAugment** (Cubuk et al. 2020), ``data.randaugment_n`` ops (0: off) drawn uniformly
with replacement from `OPS` and applied in turn, each at magnitude ``data.randaugment_m``
on the paper's 0..10 scale; with v = m / 10 in [0, 1] and a fair coin s = +-1 per op:

  identity      nothing
  autocontrast  blend with PIL's autocontrast (each channel stretched to 0..255), weight v
  equalize      blend with PIL's equalize (per-channel histogram equalisation), weight v
  rotate        by s * 30 v degrees about the centre
  solarize      invert (255 - x) the pixels x >= 256 (1 - v)
  posterize     keep the top 8 - round(4 v) bits (round(4 v) = 0: the image unchanged)
  color         saturation: blend with greyscale, factor 1 + s * 0.9 v
  contrast      blend with the mean grey level, factor 1 + s * 0.9 v
  brightness    blend with black, factor 1 + s * 0.9 v
  sharpness     blend with PIL's 3x3 smoothing (border pixels kept), factor 1 + s * 0.9 v
  shear_x/_y    shear s * 0.3 v about the centre
  translate_x/_y  by s * 0.45 v * S pixels

(The enhance factors and signs follow timm's "increasing" variant rather than the paper's
0.1..1.9 range, and autocontrast / equalize are blended with weight v instead of applied
fully: so every op is the identity at m = 0 and grows with m.) Geometric ops sample
bilinearly; pixels with no source are filled with the dataset mean colour ``data.mean``
(zero after normalisation). Left out: the paper's cutout-within-RandAugment and any
per-op probability (each drawn op is applied), and magnitude noise (m is fixed).

**Cutout** (DeVries & Taylor 2017, as torchvision's RandomErasing): with probability
``data.cutout`` (0: off), one square of side max(1, round(``data.cutout_size`` * S)) at a
uniform position wholly inside the image is set to zero in the normalised image, i.e. to the
dataset mean colour.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from ctran_jax.config_util import check_range

MAX_MAGNITUDE = 10.0
_RANDAUGMENT_STREAM = 1  # folded into an example's key: RandAugment's draws
_CUTOUT_STREAM = 2       # and Cutout's


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped to [0, 255]."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _factor(level, sign):
  return 1.0 + sign * 0.9 * level


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)  # ITU-R 601-2 luma, as PIL's "L"


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  spread = hi - lo
  stretched = (image - lo) * (255.0 / tf.maximum(spread, 1e-3))
  return tf.where(spread > 0, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize of one channel (values rounded to 0..255)."""
  values = tf.cast(tf.clip_by_value(tf.round(channel), 0.0, 255.0), tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  step = (tf.reduce_sum(hist) - tf.gather(hist, tf.reduce_max(values))) // 255
  lut = tf.minimum((step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1), 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), channel)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13); borders kept."""
  kernel = np.ones((3, 3), np.float32)
  kernel[1, 1] = 5.0
  kernel = np.tile((kernel / 13.0)[:, :, None, None], (1, 1, 3, 1))
  inner = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  return tf.pad(inner - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]]) + image


def _project(image: tf.Tensor, transform, fill: tf.Tensor) -> tf.Tensor:
  """Output pixel (x, y) sampled bilinearly at input ((a0 x + a1 y + a2), (b0 x + b1 y +
  b2)); outside the image: `fill` (an RGB colour)."""
  transform = tf.cast(tf.stack(list(transform) + [0.0, 0.0]), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.clip_by_value(out[0] + fill, 0.0, 255.0)


def _centre(image: tf.Tensor):
  shape = tf.cast(tf.shape(image), tf.float32)
  return (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0


def _rotate(image, level, sign, fill):
  theta = sign * level * (30.0 * math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  cx, cy = _centre(image)
  return _project(image, [cos, sin, cx - cos * cx - sin * cy,
                          -sin, cos, cy + sin * cx - cos * cy], fill)


def _shear_x(image, level, sign, fill):
  s = sign * 0.3 * level
  _, cy = _centre(image)
  return _project(image, [1.0, s, -s * cy, 0.0, 1.0, 0.0], fill)


def _shear_y(image, level, sign, fill):
  s = sign * 0.3 * level
  cx, _ = _centre(image)
  return _project(image, [1.0, 0.0, 0.0, s, 1.0, -s * cx], fill)


def _translate_x(image, level, sign, fill):
  t = sign * 0.45 * level * tf.cast(tf.shape(image)[1], tf.float32)
  return _project(image, [1.0, 0.0, -t, 0.0, 1.0, 0.0], fill)


def _translate_y(image, level, sign, fill):
  t = sign * 0.45 * level * tf.cast(tf.shape(image)[0], tf.float32)
  return _project(image, [1.0, 0.0, 0.0, 0.0, 1.0, -t], fill)


def _solarize(image, level, sign, fill):
  return tf.where(image >= 256.0 * (1.0 - level), 255.0 - image, image)


def _posterize(image, level, sign, fill):
  shift = tf.round(4.0 * level)
  step = tf.pow(2.0, shift)
  return tf.where(shift > 0, tf.floor(image / step) * step, image)


# name -> op(image, level in [0, 1], sign +-1, fill colour): float (S, S, 3) in [0, 255].
OPS = {
    "identity": lambda image, level, sign, fill: image,
    "autocontrast": lambda image, level, sign, fill: _blend(image, _autocontrast(image), level),
    "equalize": lambda image, level, sign, fill: _blend(image, _equalize(image), level),
    "rotate": _rotate,
    "solarize": _solarize,
    "posterize": _posterize,
    "color": lambda image, level, sign, fill: _blend(_grey(image), image, _factor(level, sign)),
    "contrast": lambda image, level, sign, fill: _blend(
        tf.reduce_mean(_grey(image)), image, _factor(level, sign)),
    "brightness": lambda image, level, sign, fill: _blend(
        tf.zeros_like(image), image, _factor(level, sign)),
    "sharpness": lambda image, level, sign, fill: _blend(
        _smooth(image), image, _factor(level, sign)),
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}


def apply_op(image: tf.Tensor, index, level, sign, fill) -> tf.Tensor:
  """`OPS` entry number `index` (a scalar tensor) on `image`."""
  branches = [lambda op=op: op(image, level, sign, fill) for op in OPS.values()]
  return tf.switch_case(tf.cast(index, tf.int32), branches)


def randaugment(image: tf.Tensor, key: tf.Tensor, num_ops: int, magnitude: float,
                fill) -> tf.Tensor:
  """`num_ops` ops drawn from `OPS` by `key`, at `magnitude` (0..10), on a float (S, S, 3)
  image in [0, 255]; `fill`: the RGB colour of pixels with no source."""
  level = tf.constant(magnitude / MAX_MAGNITUDE, tf.float32)
  fill = tf.constant(fill, tf.float32)
  keys = tf.random.experimental.stateless_split(key, num=2 * num_ops)
  for i in range(num_ops):
    index = tf.random.stateless_uniform([], keys[2 * i], 0, len(OPS), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], keys[2 * i + 1]) < 0.5, -1.0, 1.0)
    image = apply_op(image, index, level, sign, fill)
  return image


def cutout(image: tf.Tensor, key: tf.Tensor, probability: float, size: int) -> tf.Tensor:
  """With `probability`, zero a `size` x `size` square wholly inside the (S, S, C) image."""
  keys = tf.random.experimental.stateless_split(key, num=3)
  side = tf.shape(image)[0]
  top = tf.random.stateless_uniform([], keys[0], 0, side - size + 1, tf.int32)
  left = tf.random.stateless_uniform([], keys[1], 0, tf.shape(image)[1] - size + 1, tf.int32)
  rows = tf.range(tf.shape(image)[0])
  cols = tf.range(tf.shape(image)[1])
  inside = (((rows >= top) & (rows < top + size))[:, None]
            & ((cols >= left) & (cols < left + size))[None, :])
  erase = inside & (tf.random.stateless_uniform([], keys[2]) < probability)
  return tf.where(erase[..., None], tf.zeros_like(image), image)


# ------------------------------------------------------------------- the train transforms


def settings(data_config) -> dict:
  """The data config's RandAugment / Cutout values (their off values when absent)."""
  return {"randaugment_n": data_config.get("randaugment_n", 0),
          "randaugment_m": data_config.get("randaugment_m", 0.0),
          "cutout": data_config.get("cutout", 0.0),
          "cutout_size": data_config.get("cutout_size", 0.5)}


def check(data_config) -> None:
  """Raises ValueError on values these augmentations cannot use."""
  s = settings(data_config)
  if not isinstance(s["randaugment_n"], int) or s["randaugment_n"] < 0:
    raise ValueError(f"config.data.randaugment_n={s['randaugment_n']!r}; expected an integer "
                     ">= 0 (0: off)")
  check_range("data.randaugment_m", s["randaugment_m"], 0.0, MAX_MAGNITUDE)
  check_range("data.cutout", s["cutout"], 0.0, 1.0)
  if not 0 < s["cutout_size"] <= 1:
    raise ValueError(f"config.data.cutout_size={s['cutout_size']!r}; expected a fraction of "
                     "the image side in (0, 1]")
  if data_config.resize_on_device and (s["randaugment_n"] or s["cutout"]):
    raise ValueError("config.data.randaugment_n and config.data.cutout need "
                     "config.data.resize_on_device=False: the device path resizes on the "
                     "accelerator, and augmenting the full-resolution crop on the host first "
                     "would cost more than the resize it saves")


def augment_pixels(image: tf.Tensor, key: tf.Tensor, data_config) -> tf.Tensor:
  """RandAugment on a train image (float (S, S, 3), [0, 255]) before it is normalised;
  the image itself when ``data.randaugment_n`` is 0."""
  s = settings(data_config)
  if not s["randaugment_n"]:
    return image
  fill = [255.0 * m for m in data_config.mean]
  return randaugment(image, tf.random.experimental.stateless_fold_in(key, _RANDAUGMENT_STREAM),
                     s["randaugment_n"], float(s["randaugment_m"]), fill)


def cutout_normalised(image: tf.Tensor, key: tf.Tensor, data_config) -> tf.Tensor:
  """Cutout on a normalised train image (zero = the mean colour); the image itself when
  ``data.cutout`` is 0."""
  s = settings(data_config)
  if not s["cutout"]:
    return image
  size = max(1, round(s["cutout_size"] * data_config.image_size))
  return cutout(image, tf.random.experimental.stateless_fold_in(key, _CUTOUT_STREAM),
                float(s["cutout"]), size)
