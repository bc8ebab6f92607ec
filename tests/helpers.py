"""Helpers shared by the tests (``from helpers import ...``): tiny models, demo configs.

conftest.py holds only fixtures and the fake-device setup; everything a test imports by
name lives here.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default
from ctran_jax.models import CTran

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(backbone_depth=0, backbone_width=8, backbone_stage_sizes=(1, 1, 1, 1),
            backbone_block="bottleneck", hidden=32, heads=4, layers=2, dropout=0.1)


def tiny_ctran(num_labels=6, seed=0, **overrides) -> CTran:
  """C-Tran on a 1-block-per-stage, width-8 bottleneck ResNet (256 channels -> hidden 32)."""
  model = CTran(num_labels, **{**TINY, **overrides}, rngs=nnx.Rngs(seed))
  model.eval()
  return model


def random_inputs(batch=2, size=64, num_labels=6, seed=0, width=None):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, size, width or size, 3)).astype(np.float32)
  states = rng.integers(-1, 2, size=(batch, num_labels)).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(states)


def demo_config(**overrides):
  """configs/default.py with dotted-key overrides (``**{"model.hidden": 32}``)."""
  config = default.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def write_config_file(path, **overrides) -> str:
  """A config file for the command line equal to `demo_config(**overrides)`."""
  path.write_text(f'''
import importlib.util

spec = importlib.util.spec_from_file_location("ctran_default", {REPO!r} + "/configs/default.py")
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)


def get_config():
  config = default.get_config()
  config.update_from_flattened_dict({overrides!r})
  return config
''')
  return str(path)


def default_data_config(**overrides):
  """configs/default.py's data section with ``overrides`` (an unknown field is a KeyError)."""
  config = default.get_config().data
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"unknown data config field {key!r}; fields: {sorted(config)}")
    config[key] = value
  return config


STEPS = 8
# A tiny C-Tran (width-8 backbone, hidden 32, one layer) on 32x32 crops of ctran_demo/tiny:
# a whole run compiles and trains in seconds.
TINY_RUN = {
    "data.name": "ctran_demo/tiny", "data.image_size": 32, "data.scale_size": 36,
    "data.crop_sizes": (36, 32, 28), "model.backbone_width": 8, "model.hidden": 32,
    "model.layers": 1, "schedule.name": "constant", "schedule.warmup_steps": 0,
    "batch_size": 16, "num_train_steps": STEPS, "log_every_steps": 1, "eval_every_steps": 4,
    "checkpoint_every_steps": 4, "eval.batch_size": 32, "eval.known_fractions": (0.0, 0.5),
}


def tiny_run_config(data_dir, **overrides):
  """`TINY_RUN` on the demo data in `data_dir`, with dotted-key overrides."""
  return demo_config(**{**TINY_RUN, "data.data_dir": data_dir, **overrides})
