"""Latency of `python -m ctran_jax.serve`: one new image, one toggle, one API call.

    python benchmarks/serve_latency.py                    # the demo config's model, untrained
    python benchmarks/serve_latency.py --model=/tmp/ctran_demo_model --repeats=50

Requests go over HTTP to a real uvicorn server on 127.0.0.1, as the page sends them:

  image    POST /api/upload (decode, eval transform, the view PNG) + POST /api/predict
           (model, record, attention maps): what the page waits for after a new image
  toggle   POST /api/predict with one more label known: what a click on a toggle waits for
  API      POST /predict (multipart image + known -> the `predict --json` record)
  model    Predictor.predict on one image, no server: the model's share of the above

Every image is a different demo test image, so no request hits the server's image cache.
Without --model the model is the demo config's (configs/default.py) with fresh weights:
the same computation as a trained demo model. Never asserted in tests: timings on shared
CPUs are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's ctran_jax, not an installed one


def demo_predictor():
  """A Predictor (batch 1) of the demo config's model, fresh weights, demo labels."""
  import jax
  from flax import nnx

  from ctran_jax import predict, train
  from ctran_jax.data import demo, pipeline

  spec = importlib.util.spec_from_file_location("default", os.path.join(REPO, "configs",
                                                                        "default.py"))
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  config = default.get_config()
  model_def = train.model_from_config(config, len(demo.LABEL_NAMES))
  state = jax.jit(lambda: nnx.state(model_def.make()))()
  model = nnx.merge(nnx.split(nnx.eval_shape(model_def.make))[0], state)
  info = {"labels": list(demo.LABEL_NAMES), "transform": pipeline.eval_transform_spec(config.data),
          "source": {"dataset": config.data.name}}
  return predict.Predictor(model, info, batch_size=1), "demo config, untrained"


def timed(fn, repeats):
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(1000 * (time.perf_counter() - t0))
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="a model directory (default: the demo config, untrained)")
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args()

  import httpx2

  from ctran_jax import predict, serve
  from ctran_jax.data import demo

  t0 = time.perf_counter()
  if args.model:
    predictor = predict.Predictor.from_directory(args.model, batch_size=1)
    name = os.path.basename(os.path.normpath(args.model))
  else:
    predictor, name = demo_predictor()
  service = serve.Service(predictor, name=name)
  startup = time.perf_counter() - t0
  labels = predictor.labels

  with tempfile.TemporaryDirectory() as folder:
    paths = [path for path, _ in demo.write_images(folder, count=3 * args.repeats + 1)]
    images = []
    for path in paths:
      with open(path, "rb") as f:
        images.append((os.path.basename(path), f.read()))

  rows = []
  with serve.running(serve.create_app(service)) as url, httpx2.Client(base_url=url) as client:
    def post(path, **kwargs):
      response = client.post(path, **kwargs)
      response.raise_for_status()
      return response.json()

    post("/api/upload", files={"image": images[-1]})  # the server's first request
    ids = []

    def new_image(i):
      uploaded = post("/api/upload", files={"image": images[i]})
      post("/api/predict", json={"id": uploaded["id"], "known": {}})
      ids.append(uploaded["id"])

    def toggle(i):
      post("/api/predict", json={"id": ids[-1], "known": {labels[i % len(labels)]: i % 2}})

    def api(i):
      post("/predict", files={"image": images[args.repeats + i]},
           data={"known": json.dumps({labels[0]: 1})})

    model_input = predictor.model_input(predict.decode_image(images[0][1]))[None]
    states = predictor.label_states({})[None]

    def model(i):
      predictor.predict(model_input, states)

    rows.append(("image: /api/upload + /api/predict", timed(new_image, args.repeats)))
    rows.append(("toggle: /api/predict", timed(toggle, args.repeats)))
    rows.append(("API: /predict (image + known)", timed(api, args.repeats)))
    rows.append(("model only: Predictor.predict", timed(model, args.repeats)))

  size = predictor.transform["image_size"]
  print(f"model: {name}, {len(labels)} labels, input {size}x{size}; start-up (load, compile, "
        f"warm) {startup:.1f} s; {args.repeats} requests each, on {os.cpu_count()} CPUs")
  print(f"{'request':<36} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
  for label, times in rows:
    print(f"{label:<36} {statistics.median(times):>10.1f} "
          f"{float(np.percentile(times, 90)):>8.1f} {min(times):>8.1f}")


if __name__ == "__main__":
  main()
