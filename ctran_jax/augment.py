"""Device halves of the "ctran" transforms (``data.resize_on_device``): resize, mirror,
normalise inside the jitted step.

On one CPU core the bilinear resize of a 576x576 image costs about as much as decoding the
JPEG (benchmarks/input_pipeline.py), so a host feeding an accelerator spends most of its
time resizing. With ``data.resize_on_device`` the host only decodes the pixels a transform
reads and ships them at original resolution in a fixed-size uint8 canvas; the functions
here, traced into the jitted train step (`resize_windows`) and eval/predict step
(`centre_crop_windows`), do the rest. Both reproduce ``tf.image.resize`` (bilinear,
half-pixel centres, no antialiasing) exactly, so each path sees the host path's pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sample_points(extent: jax.Array, out_size: int, first, count: int, origin=0):
  """Bilinear source rows of outputs ``first .. first + count - 1`` of a resize of ``extent``
  rows to ``out_size`` (tf.image.resize: half-pixel centres, edges clamped), as
  (lower, upper, weight of upper), rows counted from ``origin``."""
  extent = extent.astype(jnp.float32)
  pos = (jnp.arange(count, dtype=jnp.float32) + first + 0.5) * (extent / out_size) - 0.5
  pos = jnp.clip(pos, 0.0, extent - 1.0)
  lower = jnp.floor(pos)
  upper = jnp.minimum(lower + 1.0, extent - 1.0)
  return (lower.astype(jnp.int32) - origin, upper.astype(jnp.int32) - origin, pos - lower)


def _interpolate(canvas, rows, cols):
  """Separable bilinear interpolation of a (C, C, 3) canvas at `_sample_points`."""
  y0, y1, wy = rows
  x0, x1, wx = cols
  image = canvas.astype(jnp.float32)
  image = image[y0] * (1.0 - wy)[:, None, None] + image[y1] * wy[:, None, None]
  return image[:, x0] * (1.0 - wx)[None, :, None] + image[:, x1] * wx[None, :, None]


def _normalise(pixels, mean, std, dtype):
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((pixels / 255.0 - mean) / std).astype(dtype)


def resize_windows(canvas: jax.Array, window: jax.Array, flip: jax.Array, *, size: int,
                   mean, std, dtype=jnp.float32) -> jax.Array:
  """Train: (B, C, C, 3) uint8 canvases whose top-left (h, w) = `window` holds each crop
  (`pipeline.ctran_train_window`) -> (B, size, size, 3) normalised images, mirrored where
  `flip`."""
  def one(canvas, height, width, flip):
    x0, x1, wx = _sample_points(width, size, 0, size)
    cols = tuple(jnp.where(flip, v[::-1], v) for v in (x0, x1, wx))
    return _interpolate(canvas, _sample_points(height, size, 0, size), cols)

  resized = jax.vmap(one)(canvas, window[:, 0], window[:, 1], flip)
  return _normalise(resized, mean, std, dtype)


def centre_crop_windows(canvas: jax.Array, extent: jax.Array, origin: jax.Array, *,
                        scale: int, size: int, mean, std, dtype=jnp.float32) -> jax.Array:
  """Eval: the centre ``size`` crop of each image resized to ``scale`` x ``scale``, normalised.

  (B, C, C, 3) uint8 canvases holding, at their top-left, the part of an image of
  (height, width) = `extent` (B, 2) that starts at (row, column) = `origin` (B, 2) and
  covers every pixel the crop samples (`pipeline.ctran_eval_window`) -> (B, size, size, 3).
  Equals `pipeline.centre_crop` (bilinear, no antialiasing: the host path antialiases only
  images larger than ``scale``, which `ctran_eval_window` resizes on the host).
  """
  if not 0 < size <= scale:
    raise ValueError(f"need 0 < size <= scale, got size={size}, scale={scale}")
  offset = int(round((scale - size) / 2.0))  # as pipeline.centre_crop (torchvision)

  def one(canvas, extent, origin):
    rows = _sample_points(extent[0], scale, offset, size, origin[0])
    cols = _sample_points(extent[1], scale, offset, size, origin[1])
    return _interpolate(canvas, rows, cols)

  resized = jax.vmap(one)(canvas, extent, origin)
  return _normalise(resized, mean, std, dtype)
