"""Throughput of `python -m ctran_jax.predict` over a folder of JPEGs, and where the time goes.

    python benchmarks/predict.py                                   # demo model, 640x480 JPEGs
    python benchmarks/predict.py --model=/tmp/ctran_demo_model --count=256 --batch_size=32
    python benchmarks/predict.py --r101 --count=8 --batch_size=2   # C-Tran-R101 at 576^2

The images are demo scenes rendered at ``--size`` and saved as JPEG (quality 90), like a
folder of photos. Rows (each over the same images, after one warm-up batch compiled the
model):

  decode      predict.read_image: file read + JPEG decode + EXIF + RGB
  transform   Predictor.model_input: the eval transform (resize, centre crop, normalise)
  model       Predictor.predict on the transformed batch (probabilities + attention maps)
  end to end  predict.run, as the command does it (tables written to /dev/null)

``--r101`` uses configs/coco.py's model (C-Tran-R101, hidden 2048, 576^2, 80 labels) with
fresh weights: the model row is what a trained COCO model costs per image. Without
--model/--r101 the model is the demo config's with fresh weights (the same computation
as a trained demo model). Never asserted in tests: timings on shared CPUs are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's ctran_jax, not an installed one


def fresh_predictor(config_file: str, num_labels: int, labels, batch_size: int):
  """A Predictor of a config file's model with fresh weights."""
  import jax
  from flax import nnx

  from ctran_jax import predict, train
  from ctran_jax.data import pipeline

  spec = importlib.util.spec_from_file_location("bench_config",
                                                os.path.join(REPO, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model_def = train.model_from_config(config, num_labels)
  state = jax.jit(lambda: nnx.state(model_def.make()))()
  model = nnx.merge(nnx.split(nnx.eval_shape(model_def.make))[0], state)
  info = {"labels": list(labels), "transform": pipeline.eval_transform_spec(config.data),
          "source": {"dataset": config.data.name}}
  return predict.Predictor(model, info, batch_size=batch_size)


def write_jpegs(folder: str, count: int, width: int, height: int) -> list[str]:
  """`count` demo scenes at width x height as JPEG files."""
  from PIL import Image

  from ctran_jax.data import demo

  paths = []
  for i in range(count):
    scene = demo.render_example(np.random.default_rng([7, i]), 64)["image"]
    image = Image.fromarray(scene).resize((width, height), Image.BILINEAR)
    paths.append(os.path.join(folder, f"img_{i:05d}.jpg"))
    image.save(paths[-1], quality=90)
  return paths


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="a model directory (default: the demo config, fresh weights)")
  p.add_argument("--r101", action="store_true", help="C-Tran-R101 at 576^2, fresh weights")
  p.add_argument("--count", type=int, default=128, help="images")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--size", default="640x480", help="JPEG width x height")
  args = p.parse_args(argv)
  try:
    width, height = (int(v) for v in args.size.split("x"))
  except ValueError:
    p.error(f"--size={args.size}; expected WIDTHxHEIGHT, e.g. 640x480")
  if args.count < 1 or args.batch_size < 1:
    p.error("--count and --batch_size must be positive")

  from ctran_jax import predict
  from ctran_jax.data import demo

  if args.model:
    predictor = predict.Predictor.from_directory(args.model, batch_size=args.batch_size)
    name = os.path.basename(os.path.normpath(args.model))
  elif args.r101:
    predictor = fresh_predictor("coco.py", 80, [f"label{i}" for i in range(80)],
                                args.batch_size)
    name = "C-Tran-R101 (configs/coco.py), fresh weights"
  else:
    predictor = fresh_predictor("default.py", len(demo.LABEL_NAMES), demo.LABEL_NAMES,
                                args.batch_size)
    name = "demo config, fresh weights"

  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(folder, args.count, width, height)
    states = predictor.label_states({})
    warm = predictor.model_input(predict.read_image(paths[0]))[None]
    compile_s = seconds(lambda: predictor.predict(warm, states[None]))  # compiles

    decoded, inputs = [], []
    decode_s = seconds(lambda: decoded.extend(predict.read_image(path) for path in paths))
    transform_s = seconds(lambda: inputs.extend(predictor.model_input(x) for x in decoded))
    batch = np.stack(inputs)
    model_s = seconds(lambda: predictor.predict(batch, np.tile(states, (len(batch), 1))))
    with open(os.devnull, "w") as null:
      total_s = seconds(lambda: predict.run(paths, predictor, known={}, top=5, threshold="0.5",
                                            as_json=False, attention_dir=None, out=null))

  size = predictor.transform["image_size"]
  print(f"model: {name}, {len(predictor.labels)} labels, input {size}x{size}; "
        f"{args.count} JPEGs {width}x{height}, batch {args.batch_size}, {os.cpu_count()} CPUs; "
        f"first batch (compile) {compile_s:.1f} s")
  parts = decode_s + transform_s + model_s
  print(f"{'part':<12} {'images/s':>9} {'ms/image':>9} {'share':>6}")
  for label, s in (("decode", decode_s), ("transform", transform_s), ("model", model_s)):
    print(f"{label:<12} {args.count / s:>9.1f} {1000 * s / args.count:>9.2f} "
          f"{100 * s / parts:>5.0f}%")
  print(f"{'end to end':<12} {args.count / total_s:>9.1f} {1000 * total_s / args.count:>9.2f}")


if __name__ == "__main__":
  main()
