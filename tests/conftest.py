"""Fixtures (tiny models and data that build in seconds on 2 CPU cores) and fake devices.

Helpers that tests import by name are in helpers.py.
"""

import os

# Eight fake CPU devices for the mesh tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import pytest  # noqa: E402
from helpers import tiny_ctran  # noqa: E402


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


@pytest.fixture(scope="session")
def trained_tiny(demo_data_dir, tmp_path_factory):
  """(workdir, model directory) of one tiny training run, exported (`tiny_run_config`):
  shared by the prediction and serving tests."""
  from helpers import tiny_run_config

  from ctran_jax import export_model, train

  tmp = tmp_path_factory.mktemp("trained_tiny")
  workdir, model_dir = str(tmp / "run"), str(tmp / "model")
  train.train_and_evaluate(tiny_run_config(demo_data_dir), workdir)
  export_model.export(workdir, "latest", model_dir)
  return workdir, model_dir
