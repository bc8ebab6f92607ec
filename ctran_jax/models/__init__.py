"""Pure Flax NNX models: the ResNet and Inception-v3 backbones, the encoder layer and C-Tran."""

from ctran_jax.models.ctran import BACKBONES, CTran, sincos_position_embedding_2d
from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.resnet import RESNET_SPECS, BatchNorm, ResNet

__all__ = ["CTran", "ResNet", "InceptionV3", "BatchNorm", "BACKBONES", "RESNET_SPECS",
           "sincos_position_embedding_2d"]
