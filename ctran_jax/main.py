r"""Train or evaluate C-Tran.

    python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/ctran_demo
    python -m ctran_jax.main --config=configs/coco.py --workdir=gs://bucket/coco \
        --config.batch_size=64
    python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/ctran_demo \
        --mode=eval --checkpoint=best

``--mode=train`` (default) trains, evaluates every ``config.eval_every_steps``, checkpoints,
and resumes from the workdir's latest checkpoint when there is one. ``--mode=eval``
evaluates ``--checkpoint`` (latest, best, or a step directory) and writes
``WORKDIR/eval/results.json``. Any config value can be overridden with
``--config.<key>=<value>``; a misspelt key is an error.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(), e.g. configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate) or only "
                          "evaluate a checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "--mode=eval: 'latest', 'best' or a "
                                  "checkpoint step directory.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of known errors "
                               "(bad config, data or checkpoint) instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drop INFO records of orbax and TFDS internals: they bury the training log."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that --help and flag errors are instant (TF + JAX import takes seconds).
  from ctran_jax import checkpoint, train
  from ctran_jax.data import pipeline

  logging.get_absl_handler().addFilter(_QuietLibraries())
  config, workdir = _CONFIG.value, _WORKDIR.value
  known_errors = (ValueError, OSError, checkpoint.CheckpointError,
                  FloatingPointError, getattr(pipeline, "DatasetError", ValueError))
  try:
    os.makedirs(workdir, exist_ok=True)
    logging.info("config:\n%s", config)
    if _MODE.value == "train":
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
  except known_errors as e:
    if _TRACEBACK.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for a misspelt ``--config.<key>``.

  ml_collections reports an unknown key as an AttributeError/KeyError from deep inside
  absl; a user should see the key, the suggestion and nothing else.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpshort to see the flags.", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    detail = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ")
    detail = detail.replace("\\'", "'").replace("\n", " ")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config key {detail} (overrides given: {', '.join(overrides)}); "
          "the keys are listed in the config file's get_config()", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
