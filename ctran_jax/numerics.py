"""Precision helpers shared by models and losses."""

import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
  """Upcast bfloat16/float16 to float32 for reductions and softmax; keep float32/float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
