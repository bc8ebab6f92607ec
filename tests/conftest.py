"""Shared test fixtures: tiny C-Tran models that build and compile in seconds on 2 CPU cores."""

import os

# Eight fake CPU devices for the mesh tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from ctran_jax.models import CTran  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_model():
  return tiny_ctran()


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the generated ``ctran_demo/tiny`` dataset (built once)."""
  import tensorflow_datasets as tfds

  import ctran_jax.data  # noqa: F401  (registers the builders)

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("ctran_demo/tiny", data_dir=data_dir).download_and_prepare()
  return data_dir
