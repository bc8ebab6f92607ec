"""Linear probe of trained backbones: does label-mask training under-train the image path?

    python benchmarks/lmt_probe.py --config=configs/default.py \\
        --workdir=/tmp/lmt/reference/seed0 --workdir=/tmp/lmt/no_lmt/seed0 \\
        --config.data.data_dir=/tmp/lmt/tfds

For each workdir: restore its latest checkpoint (with the config it was trained with: the
same ``--config`` and overrides, where the model keys must match), pool the backbone's
feature map over space for every train and test image (eval transform, no augmentation),
fit one logistic regression per label on the frozen train features (full-batch Adam on
standardised features, a little L2), and report test mAP of the probe beside the model's
own test mAP with no label known. The probe sees only the image path, so a backbone that
learnt less about the images probes lower. Never run by the tests.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config.")
_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Trained workdirs to probe.")
_STEPS = flags.DEFINE_integer("probe_steps", 1000, "Adam steps of the linear probe.")


def features(config, workdir):
  """(train features, train labels, test features, test labels, model test mAP at 0 %)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ctran_jax import checkpoint, evaluate, sharding, train
  from ctran_jax.data import pipeline

  mesh = sharding.make_mesh(1, 1)
  source = pipeline.open_source(config.data)
  model_def = train.model_from_config(config, source.meta.num_labels)
  tx, _ = train.make_optimizer(config, max(config.num_train_steps, 1))
  abstract, _ = train.train_state(config, mesh, model_def, tx)
  directory, step = checkpoint.resolve(workdir, "latest")
  state, _ = checkpoint.restore(directory, step, abstract, model_config=model_def.description,
                                num_labels=source.meta.num_labels)

  finish_images = evaluate.finish_eval_images(config)  # data.resize_on_device

  @jax.jit
  def pooled(params, batch_stats, batch):
    model = model_def.merge(params, batch_stats)
    model.eval()
    images = finish_images(batch) if finish_images else batch["image"]
    return jnp.mean(model.backbone(images), axis=(1, 2))

  out = []
  for split in (config.data.train_split, config.data.test_split):
    feats, labels = [], []
    for batch in pipeline.eval_dataset(source, split, batch_size=config.eval.batch_size):
      valid = batch["valid"].astype(bool)
      images = {k: batch[k] for k in evaluate.IMAGE_FIELDS if k in batch}
      f = pooled(state["params"], state["batch_stats"], images)
      feats.append(np.asarray(f)[valid])
      labels.append(batch["labels"][valid])
    out += [np.concatenate(feats), np.concatenate(labels)]
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    import json
    doc = json.load(f)
  own = doc["splits"][config.data.test_split]["known"][evaluate.fraction_key(0.0)]["mAP"]
  return (*out, own)


def probe_map(train_x, train_y, test_x, test_y, steps: int) -> float:
  """Test mAP of per-label logistic regressions fitted on standardised train features."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from ctran_jax import metrics

  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  x, xt = (train_x - mean) / std, (test_x - mean) / std
  y = train_y.astype(np.float32)
  params = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros(y.shape[1])}
  tx = optax.adam(1e-2)

  def loss(p):
    logits = x @ p["w"] + p["b"]
    return optax.sigmoid_binary_cross_entropy(logits, y).mean() + 1e-4 * jnp.sum(p["w"] ** 2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = step(params, opt)
  scores = np.asarray(xt @ params["w"] + params["b"])
  return metrics.mean_average_precision(test_y, metrics.sigmoid(scores))


def main(argv):
  del argv
  if not _WORKDIRS.value:
    raise app.UsageError("give at least one --workdir")
  rows = []
  for workdir in _WORKDIRS.value:
    train_x, train_y, test_x, test_y, own = features(_CONFIG.value, workdir)
    rows.append((workdir, 100 * own, 100 * probe_map(train_x, train_y, test_x, test_y,
                                                      _STEPS.value), train_x.shape[1]))
    print(f"probed {workdir}", flush=True)
  print("\n| workdir | model test mAP, 0 % known | linear probe test mAP | feature dim |")
  print("|---|---|---|---|")
  for workdir, own, probe, dim in rows:
    print(f"| {workdir} | {own:.1f} | {probe:.1f} | {dim} |")


if __name__ == "__main__":
  app.run(main)
