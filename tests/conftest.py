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
