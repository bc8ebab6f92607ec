"""ResNet v1.5 in torchvision layout (NHWC), as the C-Tran backbone.

Attribute names mirror torchvision's module tree (``conv1``, ``bn1``, ``layer1`` ...
``layer4``, blocks with ``conv1..3`` / ``bn1..3`` / ``downsample``) so that importing
ImageNet weights is a simple name map (see ``ctran_jax.convert``).  Padding is explicit
and identical to torch's, never ``'SAME'``: with stride 2 the two disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ctran_jax.numerics import at_least_float32

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # torch convention: new = (1 - m) * old + m * batch
BN_MODES = ("train", "frozen")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  block: str  # "basic" or "bottleneck"
  stage_sizes: tuple[int, ...]


RESNET_SPECS = {
    18: ResNetSpec("basic", (2, 2, 2, 2)),
    34: ResNetSpec("basic", (3, 4, 6, 3)),
    50: ResNetSpec("bottleneck", (3, 4, 6, 3)),
    101: ResNetSpec("bottleneck", (3, 4, 23, 3)),
    152: ResNetSpec("bottleneck", (3, 8, 36, 3)),
}

# torchvision's conv init: kaiming normal, fan_out, relu gain.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.Module):
  """BatchNorm with torch semantics, over all axes but the last.

  Differs from ``nnx.BatchNorm`` where parity needs it: the running variance is updated
  with the *unbiased* batch variance (torch), normalisation uses the biased one.
  ``mode="frozen"`` always normalises with the running statistics and never updates them,
  whatever ``train()``/``eval()`` say; ``mode="train"`` follows ``use_running_average``
  (set by ``model.train()`` / ``model.eval()``).  Statistics are computed in (at least)
  float32; under ``jax.jit`` with a batch-sharded input they are global-batch statistics.
  """

  epsilon = BN_EPSILON  # torch's default; subclasses change it (Inception-v3: 1e-3)

  def __init__(self, num_features: int, *, mode: str = "train", dtype=jnp.float32):
    if mode not in BN_MODES:
      raise ValueError(f"BatchNorm mode must be one of {BN_MODES}, got {mode!r}")
    self.num_features = num_features
    self.mode = mode
    self.dtype = dtype
    self.use_running_average = True
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def set_view(self, use_running_average: bool | None = None):
    """Lets ``nnx.view(model, use_running_average=...)`` switch this module too."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = at_least_float32(x)
    if self.mode == "frozen" or self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      n = x32.size // x32.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * mean
      self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (x32 - mean) * inv + self.bias[...]
    return y.astype(self.dtype)


def _conv(cin, cout, kernel, stride, pad, dtype, rngs):
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=_conv_init, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)``: padding never wins the max."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, *, bn_mode, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = _conv(cin, width, 3, stride, 1, dtype, rngs)
    self.bn1 = BatchNorm(width, mode=bn_mode, dtype=dtype)
    self.conv2 = _conv(width, cout, 3, 1, 1, dtype, rngs)
    self.bn2 = BatchNorm(cout, mode=bn_mode, dtype=dtype)
    self.downsample = _downsample(cin, cout, stride, bn_mode, dtype, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """torchvision v1.5 bottleneck: the stride sits on the 3x3 conv."""

  expansion = 4

  def __init__(self, cin, width, stride, *, bn_mode, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = _conv(cin, width, 1, 1, 0, dtype, rngs)
    self.bn1 = BatchNorm(width, mode=bn_mode, dtype=dtype)
    self.conv2 = _conv(width, width, 3, stride, 1, dtype, rngs)
    self.bn2 = BatchNorm(width, mode=bn_mode, dtype=dtype)
    self.conv3 = _conv(width, cout, 1, 1, 0, dtype, rngs)
    self.bn3 = BatchNorm(cout, mode=bn_mode, dtype=dtype)
    self.downsample = _downsample(cin, cout, stride, bn_mode, dtype, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


def _downsample(cin, cout, stride, bn_mode, dtype, rngs):
  """torchvision's ``downsample = Sequential(conv1x1, bn)`` when the shape changes."""
  if stride == 1 and cin == cout:
    return None
  return nnx.List([_conv(cin, cout, 1, stride, 0, dtype, rngs),
                   BatchNorm(cout, mode=bn_mode, dtype=dtype)])


def _shortcut(downsample, x):
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


class ResNet(nnx.Module):
  """Returns the last stage's feature map, (B, H/32, W/32, C), no pooling, no ``fc``.

  ``depth`` picks a torchvision preset; ``stage_sizes``/``block`` override it for tiny
  test backbones, and ``width`` (64 in torchvision) scales every stage's channels.
  """

  def __init__(self, depth: int = 101, *, width: int = 64, stage_sizes: Sequence[int] | None = None,
               block: str | None = None, bn_mode: str = "train", dtype=jnp.float32,
               rngs: nnx.Rngs):
    if depth not in RESNET_SPECS and (stage_sizes is None or block is None):
      raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)} "
                       f"(or give stage_sizes and block), got {depth}")
    spec = RESNET_SPECS.get(depth)
    block = block or spec.block
    stage_sizes = tuple(stage_sizes or spec.stage_sizes)
    if block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {block!r}")
    if len(stage_sizes) != 4:
      raise ValueError(f"ResNet needs 4 stage sizes, got {stage_sizes}")
    block_cls = BasicBlock if block == "basic" else Bottleneck
    self.depth, self.block, self.stage_sizes, self.width = depth, block, stage_sizes, width
    self.dtype = dtype
    self.conv1 = _conv(3, width, 7, 2, 3, dtype, rngs)
    self.bn1 = BatchNorm(width, mode=bn_mode, dtype=dtype)
    cin = width
    for stage, num_blocks in enumerate(stage_sizes):
      stage_width = width * 2**stage
      blocks = []
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(block_cls(cin, stage_width, stride, bn_mode=bn_mode, dtype=dtype, rngs=rngs))
        cin = stage_width * block_cls.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.num_features = cin
    self.remat = False  # see `set_remat`: recompute each residual block in backward

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    # model.train() on XLA:CPU: see `materialize`.
    barriers = not self.bn1.use_running_average and jax.default_backend() == "cpu"
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = max_pool_3x3_s2(x)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = _remat_block(block, x) if self.remat else block(x)
        if barriers:
          x = materialize(x)
    return x


def materialize(x: jax.Array) -> jax.Array:
  """``x``, computed once into its own buffer: a fusion barrier for XLA.

  Why: the residual stream of a stage is one long elementwise chain (block k's output is
  relu(bn(conv) + output of block k-1)). For the weight gradients XLA:CPU transposes each
  conv's input, and its fusion pass fuses the whole chain into every such transpose,
  recomputing up to 23 blocks' BatchNorm + add + relu per transpose: ~0.9 s of a ~3.5 s
  C-Tran-R101 CPU train step at 224^2 (benchmarks/step_breakdown.py). A conditional cannot
  be fused into, so its output is read, not recomputed. `jax.lax.optimization_barrier`
  does not do this (XLA:CPU drops it before fusion); a conditional whose branches are
  identical is simplified away, hence the branch taken on a NaN, which returns NaN
  everywhere: only in training (``model.train()``), where a NaN anywhere already makes the
  summed loss non-finite and the step is skipped. Evaluation has no backward pass and skips
  this, and so do GPUs and TPUs: they have no such transposes, and a conditional there can
  cost a device-to-host sync of its predicate.
  """
  return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: v + jnp.nan, lambda v: v, x)


@nnx.remat(graph=True, graph_updates=True)
def _remat_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  """A residual block under ``jax.checkpoint``: only its input is kept for backward."""
  return block(x)
