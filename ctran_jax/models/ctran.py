"""C-Tran: image tokens + label tokens (label + state embeddings) -> encoder -> per-label logits.

Label states follow the reference's mask convention: ``-1`` unknown, ``0`` known negative,
``1`` known positive.  The state embedding table has rows [unknown, negative, positive]
(index = state + 1); the unknown row is a random vector that never trains (the reference
declares it ``padding_idx`` but re-initialises it, so it is not zero), unless
``train_unknown_state`` asks for it to be learnt like the other rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.resnet import ResNet
from ctran_jax.models.transformer import EncoderLayer, layer_norm, linear, uniform_init
from ctran_jax.numerics import at_least_float32

UNKNOWN, NEGATIVE, POSITIVE = -1, 0, 1
BACKBONES = ("resnet", "inception_v3")


def sincos_position_embedding_2d(height: int, width: int, dim: int) -> np.ndarray:
  """DETR-style 2-D sine/cosine table, (height*width, dim), row-major over (y, x).

  The first half of the channels encodes x, the second half y; inside each half, even
  channels are sines and odd channels cosines of geometrically spaced frequencies.
  """
  if dim % 4:
    raise ValueError(f"2-D position embedding needs hidden % 4 == 0, got {dim}")
  half = dim // 2
  freqs = np.exp(np.arange(0, half, 2) * (-math.log(10000.0) / half))  # (half/2,)

  def encode(positions):  # (n,) -> (n, half), sin/cos interleaved
    angles = positions[:, None] * freqs[None, :]
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(len(positions), half)

  ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                       indexing="ij")
  table = np.concatenate([encode(xs.ravel()), encode(ys.ravel())], axis=-1)
  return table.astype(np.float32)


class LabelwiseLinear(nnx.Module):
  """One linear classifier per label token: ``logit_i = <h_i, W[i]> + b[i]``."""

  def __init__(self, num_labels: int, hidden: int, *, rngs: nnx.Rngs):
    init = uniform_init(1 / math.sqrt(hidden))
    self.kernel = nnx.Param(init(rngs.params(), (num_labels, hidden)))
    self.bias = nnx.Param(init(rngs.params(), (num_labels,)))

  def __call__(self, label_tokens: jax.Array) -> jax.Array:
    h = at_least_float32(label_tokens)
    return jnp.einsum("bld,ld->bl", h, self.kernel[...].astype(h.dtype)) + self.bias[...]


class CTran(nnx.Module):
  """C-Tran (Lanchantin et al., CVPR 2021) as an NNX module.

  Args:
    num_labels: L, the number of label tokens / logits.
    backbone: "resnet" (the reference's CTranModel) or "inception_v3" (its CUB model:
      Mixed_7c, 8x8 = 64 image tokens at 299x299, and Dropout(``dropout``) on the feature
      map in training as the reference applies; no aux logits since the reference's aux
      loss weight is 0). The ``backbone_*`` arguments only apply to "resnet".
    backbone_depth: torchvision ResNet depth (18/34/50/101/152).
    backbone_width, backbone_stage_sizes, backbone_block: tiny-backbone overrides.
    hidden: token width (2048 in the reference); a linear projection is added when the
      backbone's channels differ from it.
    heads, layers, ffn_dim (default = hidden), dropout: the encoder.
    use_lmt: add state embeddings to label tokens (else ``label_states`` is ignored).
    train_unknown_state: let the unknown row of the state table train (the reference keeps
      it at its random initial value).
    pos_emb: add a 2-D sine/cosine position embedding to image tokens (off = reference).
    image_tokens: include image tokens (off = the label-only ablation).
    bn_mode: "train" (batch statistics in ``train()``, as the reference) or "frozen".
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """

  def __init__(self, num_labels: int, *, backbone: str = "resnet", backbone_depth: int = 101,
               backbone_width: int = 64,
               backbone_stage_sizes=None, backbone_block=None, hidden: int = 2048,
               heads: int = 4, layers: int = 3, ffn_dim: int | None = None,
               dropout: float = 0.1, use_lmt: bool = True,
               train_unknown_state: bool = False, pos_emb: bool = False,
               image_tokens: bool = True, bn_mode: str = "train", dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_labels < 1:
      raise ValueError(f"num_labels must be positive, got {num_labels}")
    if layers < 1:
      raise ValueError(f"layers must be positive, got {layers}")
    if backbone not in BACKBONES:
      raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    self.num_labels, self.hidden = num_labels, hidden
    self.use_lmt, self.pos_emb, self.image_tokens = use_lmt, pos_emb, image_tokens
    self.train_unknown_state = train_unknown_state
    self.dtype = dtype
    self.backbone_kind = backbone
    if backbone == "inception_v3":
      self.backbone = InceptionV3(bn_mode=bn_mode, dtype=dtype, rngs=rngs)
    else:
      self.backbone = ResNet(backbone_depth, width=backbone_width,
                             stage_sizes=backbone_stage_sizes, block=backbone_block,
                             bn_mode=bn_mode, dtype=dtype, rngs=rngs)
    channels = self.backbone.num_features
    self.projection = (linear(channels, hidden, dtype=dtype, rngs=rngs)
                       if channels != hidden else None)
    embed_init = uniform_init(1 / math.sqrt(hidden))
    self.label_embedding = nnx.Embed(num_labels, hidden, embedding_init=embed_init, rngs=rngs)
    self.state_embedding = nnx.Embed(3, hidden, embedding_init=embed_init, rngs=rngs)
    self.input_norm = layer_norm(hidden, dtype=dtype, rngs=rngs)
    self.encoder = nnx.List([
        EncoderLayer(hidden, heads, ffn_dim or hidden, dropout, dtype=dtype, rngs=rngs)
        for _ in range(layers)])
    self.head = LabelwiseLinear(num_labels, hidden, rngs=rngs)
    # The reference's CUB model drops out Inception features; its ResNet model does not.
    self.feature_dropout = (nnx.Dropout(dropout, rngs=rngs) if backbone == "inception_v3"
                            else None)

  def set_view(self, use_lmt: bool | None = None, image_tokens: bool | None = None,
               pos_emb: bool | None = None):
    """``nnx.view(model, use_lmt=False)`` etc.: the same weights with a switch flipped.

    None of these switches owns parameters, so ablations need no second model.
    """
    for name, value in (("use_lmt", use_lmt), ("image_tokens", image_tokens),
                        ("pos_emb", pos_emb)):
      if value is not None:
        setattr(self, name, value)

  def __call__(self, images: jax.Array, label_states: jax.Array, *,
               return_attention: bool = False):
    """images (B, H, W, 3) normalised NHWC; label_states (B, L) in {-1, 0, 1}.

    Returns logits (B, L) in float32 (float64 under a float64 dtype), or
    (logits, attention (layers, B, S, S)) when ``return_attention``.
    """
    out = self.classify_features(self.backbone(images), label_states)
    return (out["logits"], out["attention"]) if return_attention else out["logits"]

  def label_tokens(self, batch_size: int, label_states: jax.Array) -> jax.Array:
    """(B, L, D): label embedding, plus the state embedding of each label when ``use_lmt``."""
    tokens = jnp.broadcast_to(self.label_embedding.embedding[...][None],
                              (batch_size, self.num_labels, self.hidden))
    if self.use_lmt:
      table = self.state_embedding.embedding[...]
      if not self.train_unknown_state:
        # The unknown row is fixed: it takes part in the forward pass, never in training.
        table = jnp.concatenate([jax.lax.stop_gradient(table[:1]), table[1:]], axis=0)
      tokens = tokens + table[jnp.asarray(label_states).astype(jnp.int32) + 1]
    return tokens.astype(self.dtype)

  def classify_features(self, feature_map: jax.Array, label_states: jax.Array) -> dict:
    """Everything after the backbone; returns the intermediates parity and analysis use.

    Keys: ``logits`` (B, L), ``attention`` (layers, B, S, S) head-averaged query x key,
    ``tokens`` (input-LayerNorm output, B, S, D), ``hidden`` (last layer output).
    """
    b, h, w, _ = feature_map.shape
    if jnp.shape(label_states) != (b, self.num_labels):
      raise ValueError(f"label_states must have shape {(b, self.num_labels)}, "
                       f"got {jnp.shape(label_states)}")
    parts = []
    if self.image_tokens:
      image = feature_map.reshape(b, h * w, feature_map.shape[-1]).astype(self.dtype)
      if self.feature_dropout is not None:
        image = self.feature_dropout(image)
      if self.projection is not None:
        image = self.projection(image)
      if self.pos_emb:
        image = image + jnp.asarray(sincos_position_embedding_2d(h, w, self.hidden), self.dtype)
      parts.append(image)
    parts.append(self.label_tokens(b, label_states))
    x = self.input_norm(jnp.concatenate(parts, axis=1))
    tokens, attention = x, []
    for layer in self.encoder:
      x, probs = layer(x)
      attention.append(probs)
    logits = self.head(x[:, -self.num_labels:])
    return {"logits": logits, "attention": jnp.stack(attention), "tokens": tokens, "hidden": x}
