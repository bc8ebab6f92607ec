"""Write a self-describing model directory from a training run.

    python -m ctran_jax.export_model --workdir=/tmp/ctran_demo --out=/tmp/ctran_demo_model
    python -m ctran_jax.export_model --workdir=W --checkpoint=best --out=DIR

The directory (`model_store.save_model`) holds the float32 weights and ``model.json``:
the model description, the label names and the eval transform (image size, resize rule,
mean/std), all read from the checkpoint, so `ctran_jax.predict` needs no training config.
When the run's final evaluation fitted per-class thresholds for the same step
(``W/eval/thresholds.json``) they are copied as ``thresholds.json``, and the step's test
results (``W/eval/results.json``) are summarised in ``model.json``'s ``source``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def checkpoint_model(workdir: str, which: str = "latest"):
  """(model in eval mode, model.json-style info, thresholds or None) of a checkpoint.

  The thresholds are the run's fitted ones (``W/eval/thresholds.json``) when they were
  fitted for this checkpoint's step.
  """
  import jax
  import numpy as np
  from flax import nnx

  from ctran_jax import checkpoint, model_store, thresholds

  directory, step = checkpoint.resolve(workdir, which)
  weights, meta = checkpoint.restore_weights(directory, step)
  if "transform" not in meta:
    raise checkpoint.CheckpointError(f"checkpoint {directory}/{step} predates self-describing "
                                     "checkpoints (no eval transform); retrain to export it")
  model_def = model_store.ModelDef.build(meta["model"])
  abstract = nnx.eval_shape(model_def.make)
  params, batch_stats = nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat)
  nnx.replace_by_pure_dict(params, weights["params"])
  nnx.replace_by_pure_dict(batch_stats, weights["batch_stats"])
  model = model_def.merge(jax.tree.map(np.asarray, params),
                          jax.tree.map(np.asarray, batch_stats))
  model.eval()
  source = {"workdir": os.path.abspath(workdir),
            "checkpoint": os.path.relpath(os.path.join(directory, str(step)), workdir),
            "step": step, "dataset": meta.get("dataset")}
  results_path = os.path.join(workdir, "eval", "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    if results.get("step") == step:
      source["results"] = {split: {k: v["mAP"] for k, v in report["known"].items()}
                           for split, report in results["splits"].items()}
  info = {"config": meta["model"], "labels": meta["label_names"],
          "transform": meta["transform"], "source": source}
  fitted_path = os.path.join(workdir, "eval", "thresholds.json")
  fitted = None
  if os.path.exists(fitted_path):
    doc = thresholds.load(fitted_path)
    if doc["step"] == step:
      fitted = doc
  return model, info, fitted


def export(workdir: str, which: str, out: str) -> dict:
  """Export checkpoint `which` of `workdir` to `out`; returns the written ``model.json``."""
  from ctran_jax import model_store, thresholds

  model, info, fitted = checkpoint_model(workdir, which)
  model_store.save_model(model, out, labels=info["labels"], transform=info["transform"],
                         source=info["source"])
  if fitted is not None:
    thresholds.save(os.path.join(out, "thresholds.json"), fitted["thresholds"],
                    fitted_on=fitted["fitted_on"], step=fitted["step"])
  return model_store.read_info(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ctran_jax.export_model",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--checkpoint", default="latest",
                      help="latest (default: the one eval/results.json describes, with its "
                      "fitted thresholds), best or a checkpoint step directory")
  parser.add_argument("--out", required=True, help="the model directory to write (new)")
  args = parser.parse_args(argv)
  from ctran_jax import console

  console.quiet_tool()
  from ctran_jax import checkpoint

  try:
    info = export(args.workdir, args.checkpoint, args.out)
  except (checkpoint.CheckpointError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = os.path.abspath(args.out)
  calibrated = os.path.exists(os.path.join(out, "thresholds.json"))
  print(f"wrote {out}: {info['config']['kind']} with {len(info['labels'])} labels, step "
        f"{info['source']['step']} of {info['source']['workdir']}; per-class thresholds: "
        f"{'yes' if calibrated else 'no (run --mode=eval on that checkpoint to fit them)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
