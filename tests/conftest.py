"""Shared test fixtures: tiny C-Tran models that build and compile in seconds on 2 CPU cores."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctran_jax.models import CTran

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
