"""Device half of the train transform (``data.resize_on_device``): resize, mirror, normalise.

On one CPU core the bilinear resize of a 576x576 crop costs about as much as decoding the
JPEG (benchmarks/input_pipeline.py), so a host feeding an accelerator spends most of its
time resizing. With ``data.resize_on_device`` the host only decodes the crop window and
ships it at original resolution in a fixed-size uint8 canvas; this function, traced into
the jitted train step, does the rest. It reproduces ``tf.image.resize`` (bilinear, half-
pixel centres, no antialiasing) exactly, so both paths train on the same pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sample_points(extent: jax.Array, size: int):
  """Source rows for `size` outputs over `extent` inputs: (lower, upper, weight of upper)."""
  extent = extent.astype(jnp.float32)
  pos = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (extent / size) - 0.5
  pos = jnp.clip(pos, 0.0, extent - 1.0)
  lower = jnp.floor(pos)
  upper = jnp.minimum(lower + 1.0, extent - 1.0)
  return lower.astype(jnp.int32), upper.astype(jnp.int32), pos - lower


def _resize_one(canvas, height, width, flip, size):
  y0, y1, wy = _sample_points(height, size)
  x0, x1, wx = _sample_points(width, size)
  x0, x1, wx = (jnp.where(flip, v[::-1], v) for v in (x0, x1, wx))
  image = canvas.astype(jnp.float32)
  rows = (image[y0] * (1.0 - wy)[:, None, None] + image[y1] * wy[:, None, None])
  return rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def resize_windows(canvas: jax.Array, window: jax.Array, flip: jax.Array, *, size: int,
                   mean, std, dtype=jnp.float32) -> jax.Array:
  """(B, C, C, 3) uint8 canvases whose top-left (h, w) = `window` holds each crop
  -> (B, size, size, 3) normalised images, mirrored where `flip`."""
  resized = jax.vmap(_resize_one, in_axes=(0, 0, 0, 0, None))(
      canvas, window[:, 0], window[:, 1], flip, size)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((resized / 255.0 - mean) / std).astype(dtype)
