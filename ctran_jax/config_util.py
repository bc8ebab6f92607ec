"""Config helpers: loading a sibling config file, and the wording of config errors.

``configs/`` is a folder of files, not a package (``--config=configs/coco.py`` loads it by
path), so a config that builds on another loads it with `load_sibling`; this works from any
working directory and imports nothing heavy (no TF, no JAX). Each module that reads a
config section checks it itself with `check_choice` / `check_range`, so every bad value is
reported the same way, naming its key.
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


def check_choice(key: str, value, allowed) -> None:
  """The one wording of a bad choice: ``config.<key>=<value>; expected one of ...``."""
  if value not in allowed:
    raise ValueError(f"config.{key}={value!r}; expected one of {', '.join(map(str, allowed))}")


def check_range(key: str, value, low: float, high: float, *, high_open: bool = False) -> None:
  """``config.<key>`` must lie in [low, high] (or [low, high))."""
  ok = low <= value < high if high_open else low <= value <= high
  if not ok:
    raise ValueError(f"config.{key}={value!r}; expected a value in [{low}, {high}"
                     f"{')' if high_open else ']'}")
