"""Post-norm Transformer encoder layer, as torch's ``nn.TransformerEncoderLayer``.

Written out (rather than ``nnx.MultiHeadAttention``) for two reasons: C-Tran's analysis
needs the head-averaged attention probabilities, and the packed ``in_proj`` (q, k, v
stacked on the output axis) maps one-to-one onto the reference checkpoint.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ctran_jax.numerics import at_least_float32


def uniform_init(bound: float):
  """U(-bound, bound): the reference's ``weights_init`` uses bound = 1/sqrt(fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear(din, dout, *, dtype, rngs, kernel_init=None, bias_init=None):
  """A Linear with the reference's initialisation unless told otherwise."""
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init or uniform_init(1 / math.sqrt(din)),
                    bias_init=bias_init or uniform_init(1 / math.sqrt(din)), rngs=rngs)


def layer_norm(hidden, *, dtype, rngs):
  """torch's LayerNorm: eps 1e-5 and a two-pass variance.

  The one-pass ``E[x^2] - E[x]^2`` loses precision on C-Tran's image tokens, whose
  magnitudes reach 1e5 with un-normalised backbone features.
  """
  return nnx.LayerNorm(hidden, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class EncoderLayer(nnx.Module):
  """``x = norm1(x + drop(MHA(x)))``; ``x = norm2(x + drop(linear2(drop(relu(linear1(x))))))``."""

  def __init__(self, hidden: int, heads: int, ffn_dim: int, dropout: float, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if hidden % heads:
      raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
    self.hidden, self.heads = hidden, heads
    self.dtype = dtype
    # torch MHA: in_proj xavier-uniform with zero bias; everything else as weights_init.
    self.in_proj = nnx.Linear(hidden, 3 * hidden, dtype=dtype, param_dtype=jnp.float32,
                              kernel_init=nnx.initializers.xavier_uniform(),
                              bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.out_proj = linear(hidden, hidden, dtype=dtype, rngs=rngs)
    self.linear1 = linear(hidden, ffn_dim, dtype=dtype, rngs=rngs)
    self.linear2 = linear(ffn_dim, hidden, dtype=dtype, rngs=rngs)
    self.norm1 = layer_norm(hidden, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(hidden, dtype=dtype, rngs=rngs)
    self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
    self.ffn_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
    self.remat = False  # see `set_remat`: recompute this layer's activations in backward

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: (B, S, D) -> (output (B, S, D), attention probabilities averaged over heads (B, S, S))."""
    if self.remat:
      return _remat_layer(self, x)
    return self.forward(x)

  def forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, s, d = x.shape
    head_dim = d // self.heads
    q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
    q, k, v = (t.reshape(b, s, self.heads, head_dim) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
    attention = probs.mean(axis=1)  # reported before dropout, like torch
    mixed = jnp.einsum("bhqk,bkhd->bqhd", self.attn_dropout(probs).astype(v.dtype), v)
    x = self.norm1(x + self.dropout1(self.out_proj(mixed.reshape(b, s, d))))
    ffn = self.linear2(self.ffn_dropout(nnx.relu(self.linear1(x))))
    x = self.norm2(x + self.dropout2(ffn))
    return x, attention


@nnx.remat(graph=True, graph_updates=True)
def _remat_layer(layer: EncoderLayer, x: jax.Array):
  """The layer under ``jax.checkpoint``: only its input is kept for the backward pass."""
  return layer.forward(x)
