"""Shared by configs/*.py: load a sibling config file by path.

``configs/`` is a folder of files, not a package (``--config=configs/coco.py`` loads it by
path), so a config that builds on another loads it the same way; this works from any
working directory and imports nothing heavy (no TF, no JAX).
"""

from __future__ import annotations

import importlib.util
import os
import types


def load_sibling(this_file: str, name: str) -> types.ModuleType:
  """The module of ``<folder of this_file>/<name>.py``."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"ctran_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
