"""Pure Flax NNX models: the ResNet backbone, the encoder layer and C-Tran."""

from ctran_jax.models.ctran import CTran, sincos_position_embedding_2d
from ctran_jax.models.resnet import RESNET_SPECS, BatchNorm, ResNet

__all__ = ["CTran", "ResNet", "BatchNorm", "RESNET_SPECS", "sincos_position_embedding_2d"]
