"""Input pipeline speed per CPU core: raw JPEG decode vs the training and eval transforms.

    python benchmarks/input_pipeline.py                  # COCO recipe: 640 scale, 576^2 crops
    python benchmarks/input_pipeline.py --images 400 --threads 2

Generates COCO-like JPEGs (640x480, 480x640, 640x427; smooth content plus noise, quality
90, ~150 KB like COCO's), then runs each transform through tf.data on ``--threads``
threads (default 1: images/s per core) and prints images/s and the ratio to raw decode.
The training transform is the pipeline's own (`pipeline.ctran_train_image` with the
configs/coco.py recipe) on encoded bytes, as training reads them; with
``data.resize_on_device`` the host runs only `pipeline.ctran_train_window` (decode the crop
into a uint8 canvas) and the jitted train step finishes it (`ctran_jax.augment`), whose
cost per image is timed separately on the JAX default device. The same for the eval
transform (`pipeline.centre_crop`; host half `pipeline.ctran_eval_window`, device half
`augment.centre_crop_windows`). Never asserted in tests: timings on shared CPUs are noisy;
compare rows of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402

from ctran_jax import augment  # noqa: E402
from ctran_jax.data import pipeline  # noqa: E402

SHAPES = ((480, 640), (640, 480), (427, 640), (480, 640))


def default_data_config(**overrides):
  """configs/default.py's data section (configs/ is loaded by path) with ``overrides``."""
  spec = importlib.util.spec_from_file_location(
      "ctran_jax_configs_default", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config().data
  data.update(overrides)
  return data


def coco_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """JPEGs with COCO's sizes and roughly its bytes per image (smooth shapes + sensor noise)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    h, w = SHAPES[i % len(SHAPES)]
    coarse = rng.random((1, h // 16, w // 16, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
    image = image + 0.08 * rng.standard_normal((h, w, 3))
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return out


def images_per_second(jpegs, fn, *, threads: int, count: int, warmup: int = 20) -> float:
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(fn, num_parallel_calls=threads, deterministic=True).prefetch(threads)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  it = iter(ds.with_options(options))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(count):
    next(it)
  return count / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=300, help="images timed per row")
  parser.add_argument("--distinct", type=int, default=64, help="distinct JPEGs generated")
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads (1 = per core)")
  parser.add_argument("--image_size", type=int, default=576)
  parser.add_argument("--scale_size", type=int, default=640)
  parser.add_argument("--device_batch", type=int, default=16)
  args = parser.parse_args(argv)

  data = default_data_config(
      name="coco_like", image_size=args.image_size, scale_size=args.scale_size,
      crop_sizes=tuple(c for c in (640, 576, 512, 384, 320) if c <= args.scale_size) or
      (args.scale_size,), flip=True, cache=False)
  pipeline.check_transform(data)
  jpegs = coco_like_jpegs(args.distinct)
  print(f"{len(jpegs)} COCO-like JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; "
        f"{args.threads} thread(s); {args.images} images per row", flush=True)

  def seed(i):
    return tf.random.experimental.stateless_fold_in(tf.constant([0, 0], tf.int64), i)

  rows = {
      "raw JPEG decode": lambda i, b: tf.io.decode_jpeg(b, channels=3),
      f"train transform (decode crop -> {args.image_size}^2, flip, normalise)":
          lambda i, b: pipeline.ctran_train_image(b, seed(i), data),
      "train transform, host half (data.resize_on_device: decode the crop to a canvas)":
          lambda i, b: pipeline.ctran_train_window(b, seed(i), data),
      f"  for scale: full decode + one resize to {args.image_size}^2":
          lambda i, b: tf.image.resize(tf.io.decode_jpeg(b, channels=3),
                                       (args.image_size, args.image_size)),
      f"eval transform (resize {args.scale_size}, centre crop {args.image_size})":
          lambda i, b: pipeline.centre_crop(tf.io.decode_jpeg(b, channels=3), data),
      "eval transform, host half (data.resize_on_device: decode the crop's window to a "
      "canvas)": lambda i, b: pipeline.ctran_eval_window(b, data),
  }
  results = {}
  for name, fn in rows.items():
    results[name] = images_per_second(jpegs, fn, threads=args.threads, count=args.images)
    print(f"  measured {name.strip()}: {results[name]:.1f} images/s", flush=True)
  raw = results["raw JPEG decode"]
  train_ms, eval_ms = device_half_ms(data, args.device_batch)
  width = max(len(n) for n in results)
  print(f"\n{'transform':{width}s}  images/s  per thread  vs raw decode")
  for name, rate in results.items():
    print(f"{name:{width}s}  {rate:8.1f}  {rate / args.threads:10.1f}  {rate / raw:11.0%}")
  kind = jax.devices()[0].device_kind
  print(f"\ndevice halves (batch {args.device_batch}, jitted) on {kind}: train "
        f"(augment.resize_windows) {train_ms:.2f} ms per image, eval "
        f"(augment.centre_crop_windows) {eval_ms:.2f} ms per image")


def device_half_ms(data, batch: int) -> tuple[float, float]:
  """Median time per image of the train and eval device halves, jitted, on the default JAX
  device, for 480x640 images (the eval window: `pipeline.ctran_eval_window`'s)."""
  side = pipeline.canvas_size(data)
  rng = np.random.default_rng(0)
  canvas = jax.device_put(rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8))
  window = jax.device_put(np.tile([[480, 640]], (batch, 1)).astype(np.int32))
  flip = jax.device_put(np.arange(batch) % 2 == 0)
  train = jax.jit(lambda c, w, f: augment.resize_windows(c, w, f, size=data.image_size,
                                                         mean=data.mean, std=data.std))
  eval_window = pipeline.ctran_eval_window(tf.zeros((480, 640, 3), tf.uint8), data)
  extent, origin = (jax.device_put(np.tile(eval_window[k].numpy(), (batch, 1)))
                    for k in ("extent", "origin"))
  evaluate = jax.jit(lambda c, e, o: augment.centre_crop_windows(
      c, e, o, scale=data.scale_size, size=data.image_size, mean=data.mean, std=data.std))
  return (_median_ms(train, canvas, window, flip) / batch,
          _median_ms(evaluate, canvas, extent, origin) / batch)


def _median_ms(fn, *args, repeats: int = 5) -> float:
  fn(*args).block_until_ready()  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


if __name__ == "__main__":
  main()
