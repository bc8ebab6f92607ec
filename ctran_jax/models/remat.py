"""Rematerialisation switches: trade backward-pass recomputation for activation memory.

``set_remat(model, "encoder")`` makes every encoder layer keep only its input for the
backward pass (``jax.checkpoint`` through ``nnx.remat``) and recompute the rest;
"backbone" does the same for every ResNet residual block or Inception-v3 Mixed block; "all"
for both. The switch is a static attribute, so set it before ``nnx.split`` (the graphdef
carries it); weights and outputs are unchanged, only the compiled program differs.
"""

from __future__ import annotations

from flax import nnx

from ctran_jax.models.inception import InceptionV3
from ctran_jax.models.resnet import ResNet
from ctran_jax.models.transformer import EncoderLayer

CHOICES = ("none", "backbone", "encoder", "all")


def set_remat(model: nnx.Module, which: str) -> nnx.Module:
  """Switch rematerialisation on for the parts ``which`` names (see CHOICES); returns model."""
  if which not in CHOICES:
    raise ValueError(f"remat must be one of {CHOICES}, got {which!r}")
  backbone, encoder = which in ("backbone", "all"), which in ("encoder", "all")
  found = set()
  for _, module in nnx.iter_graph(model):
    if isinstance(module, (ResNet, InceptionV3)):
      module.remat = backbone
      found.add("backbone")
    elif isinstance(module, EncoderLayer):
      module.remat = encoder
      found.add("encoder")
  if backbone and "backbone" not in found:
    raise ValueError(f"remat={which!r}: {type(model).__name__} has no ResNet or Inception-v3 "
                     "backbone")
  return model
