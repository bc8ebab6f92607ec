"""Inception-v3 in torchvision layout (NHWC), the backbone of the C-Tran CUB model.

Attribute names mirror torchvision's module tree (``Conv2d_1a_3x3`` ... ``Mixed_7c``,
``AuxLogits``, ``fc``; every ``BasicConv2d`` holds ``conv`` + ``bn``) so that ImageNet
weights (``inception_v3_google-*.pth``) import by a plain name map (``ctran_jax.convert``).
Padding and pooling follow torch exactly: explicit conv padding, 3x3/2 max pools without
padding, 3x3/1 average pools with zero padding counted in the mean (``count_include_pad``).

torchvision's ``transform_input`` (re-normalising ImageNet-normalised inputs to [-1, 1]) is
not implemented: the reference accepts the flag but never applies it; inputs come already
normalised from the data pipeline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ctran_jax.models.resnet import BatchNorm
from ctran_jax.numerics import at_least_float32

BN_EPSILON = 1e-3  # torchvision's BasicConv2d; ResNet uses 1e-5
NUM_FEATURES = 2048
MIN_SIZE = 75  # smallest input side that reaches Mixed_7c (1x1 there)
MIN_AUX_SIZE = 299  # AuxLogits needs a 17x17 Mixed_6e: 5x5/3 pool, then a 5x5 conv


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _truncated_normal(stddev: float):
  """torchvision's Inception init: N(0, stddev) truncated at +-2 stddev."""
  return nnx.initializers.truncated_normal(stddev, lower=-2.0, upper=2.0)


def _uniform(bound: float):
  """torch Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class InceptionBatchNorm(BatchNorm):
  """The ResNet BatchNorm (torch semantics, train/frozen modes) with torchvision's eps 1e-3."""

  epsilon = BN_EPSILON


class BasicConv2d(nnx.Module):
  """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0,
               stddev: float = 0.1, bn_mode: str, dtype, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride,
                         padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype,
                         param_dtype=jnp.float32, kernel_init=_truncated_normal(stddev),
                         rngs=rngs)
    self.bn = InceptionBatchNorm(cout, mode=bn_mode, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``F.max_pool2d(x, 3, stride=2)``: no padding, the border is dropped."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def avg_pool(x: jax.Array, size: int, stride: int, pad: int) -> jax.Array:
  """torch ``F.avg_pool2d`` with ``count_include_pad=True``: zero padding counts in the mean."""
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  total = jax.lax.reduce_window(at_least_float32(x), 0.0, jax.lax.add, (1, size, size, 1),
                                (1, stride, stride, 1), padding)
  return (total / (size * size)).astype(x.dtype)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_features: int, conv):
    self.branch1x1 = conv(cin, 64, 1)
    self.branch5x5_1 = conv(cin, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(cin, pool_features, 1)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool(x, 3, 1, 1)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, conv):
    self.branch3x3 = conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (17x17): factorised 7x7 convs (1x7 and 7x1) with c7 inner channels."""

  def __init__(self, cin: int, c7: int, conv):
    self.branch1x1 = conv(cin, 192, 1)
    self.branch7x7_1 = conv(cin, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(cin, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d7 = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      d7 = layer(d7)
    return jnp.concatenate(
        [self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x, 3, 1, 1))], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, conv):
    self.branch3x3_1 = conv(cin, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(cin, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x):
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate(
        [self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c (8x8): branches that split into parallel 1x3 and 3x1 convs."""

  def __init__(self, cin: int, conv):
    self.branch1x1 = conv(cin, 320, 1)
    self.branch3x3_1 = conv(cin, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(cin, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
        self.branch_pool(avg_pool(x, 3, 1, 1)),
    ], axis=-1)


class InceptionAux(nnx.Module):
  """The auxiliary classifier on Mixed_6e: avgpool 5/3 -> 1x1 -> 5x5 -> global mean -> fc."""

  def __init__(self, cin: int, num_classes: int, conv, *, dtype, rngs: nnx.Rngs):
    self.conv0 = conv(cin, 128, 1)
    self.conv1 = conv(128, 768, 5, stddev=0.01)
    bound = 1 / 768**0.5
    self.fc = nnx.Linear(768, num_classes, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=_truncated_normal(0.001),
                         bias_init=_uniform(bound), rngs=rngs)

  def __call__(self, x):
    if x.shape[1] < 17 or x.shape[2] < 17:
      raise ValueError(f"AuxLogits needs a Mixed_6e map of at least 17x17 (input >= "
                       f"{MIN_AUX_SIZE}x{MIN_AUX_SIZE}), got {x.shape[1]}x{x.shape[2]}")
    x = self.conv1(self.conv0(avg_pool(x, 5, 3, 0)))
    return at_least_float32(self.fc(jnp.mean(at_least_float32(x), axis=(1, 2)).astype(x.dtype)))


class InceptionV3(nnx.Module):
  """Inception-v3 up to Mixed_7c: (B, H, W, 3) -> (B, h, w, 2048), 8x8 at 299x299.

  Args:
    aux_logits: classes of the AuxLogits head on Mixed_6e (0 = no head). Its output is only
      meaningful in training; C-Tran leaves it off (the reference's aux loss weight is 0).
    num_classes: classes of the ImageNet-style ``fc`` head (0 = none); `classify` uses it.
    bn_mode: "train" (batch statistics in ``train()``) or "frozen", as for the ResNet.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.

  Inputs must be at least 75x75 (Mixed_7c is then 1x1) and at least 299x299 for the
  auxiliary logits.
  """

  def __init__(self, *, aux_logits: int = 0, num_classes: int = 0, bn_mode: str = "train",
               dtype=jnp.float32, rngs: nnx.Rngs):
    if aux_logits < 0 or num_classes < 0:
      raise ValueError(f"aux_logits and num_classes must be >= 0 (0 = no head), "
                       f"got {aux_logits} and {num_classes}")
    self.aux_logits, self.num_classes, self.dtype = aux_logits, num_classes, dtype
    self.num_features = NUM_FEATURES
    conv = functools.partial(BasicConv2d, bn_mode=bn_mode, dtype=dtype, rngs=rngs)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, conv)
    self.Mixed_5c = InceptionA(256, 64, conv)
    self.Mixed_5d = InceptionA(288, 64, conv)
    self.Mixed_6a = InceptionB(288, conv)
    self.Mixed_6b = InceptionC(768, 128, conv)
    self.Mixed_6c = InceptionC(768, 160, conv)
    self.Mixed_6d = InceptionC(768, 160, conv)
    self.Mixed_6e = InceptionC(768, 192, conv)
    self.AuxLogits = (InceptionAux(768, aux_logits, conv, dtype=dtype, rngs=rngs)
                      if aux_logits else None)
    self.Mixed_7a = InceptionD(768, conv)
    self.Mixed_7b = InceptionE(1280, conv)
    self.Mixed_7c = InceptionE(2048, conv)
    bound = 1 / NUM_FEATURES**0.5
    self.fc = (nnx.Linear(NUM_FEATURES, num_classes, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=_truncated_normal(0.1), bias_init=_uniform(bound),
                          rngs=rngs) if num_classes else None)
    self.remat = False  # see models.remat.set_remat: recompute each Mixed block in backward

  def __call__(self, images: jax.Array, *, return_aux: bool = False):
    """The Mixed_7c map; with `return_aux`, (map, aux logits (B, aux_logits) float32)."""
    h, w = images.shape[1:3]
    if h < MIN_SIZE or w < MIN_SIZE:
      raise ValueError(f"InceptionV3 needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, "
                       f"got {h}x{w}")
    if return_aux and self.AuxLogits is None:
      raise ValueError("this InceptionV3 has no AuxLogits head; build it with aux_logits > 0")
    x = images.astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool_3x3_s2(x)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool_3x3_s2(x)
    run = _remat_block if self.remat else (lambda block, x: block(x))
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      x = run(block, x)
    aux = self.AuxLogits(x) if return_aux else None
    for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = run(block, x)
    return (x, aux) if return_aux else x

  def classify(self, feature_map: jax.Array) -> jax.Array:
    """ImageNet-style logits: global average pool -> ``fc`` (torchvision's dropout omitted)."""
    if self.fc is None:
      raise ValueError("this InceptionV3 has no fc head; build it with num_classes > 0")
    pooled = jnp.mean(at_least_float32(feature_map), axis=(1, 2)).astype(self.dtype)
    return at_least_float32(self.fc(pooled))


@nnx.remat(graph=True, graph_updates=True)
def _remat_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  """A Mixed block under ``jax.checkpoint``: only its input is kept for backward."""
  return block(x)
