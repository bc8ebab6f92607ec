"""Deterministic synthetic weights for parity tests, following the scheme of the parity README.

The golden outputs in ``tests/data/parity`` were produced by the reference PyTorch model
holding weights drawn by this scheme; regenerating them here (numpy only, no torch) and
checking the fingerprint proves that the scheme was followed before any output is compared.

Scheme: one ``numpy.random.default_rng(seed)``; entries in spec order; each float entry
draws ``standard_normal(shape)`` (float64), is transformed by the first matching rule and
cast to its dtype; ``num_batches_tracked`` draws nothing and is int64 zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

PARITY_DIR = Path(__file__).parent / "data" / "parity"

_BATCHNORM_NAME = re.compile(r"bn\d*")


def read_spec(path: str) -> list[tuple[str, tuple[int, ...], str]]:
  """[(name, shape, dtype)] in state-dict order from a ``ctran-param-spec/v1`` JSON file."""
  with open(path) as f:
    entries = json.load(f)["entries"]
  return [(e["name"], tuple(e["shape"]), e.get("dtype", "float32")) for e in entries]


def _is_norm(module: str, name: str, leaf: str) -> bool:
  return (_BATCHNORM_NAME.fullmatch(module) is not None
          or name.endswith(f"downsample.1.{leaf}") or "norm" in module.lower())


def rule_for(name: str, shape: tuple[int, ...]) -> str:
  """Which transform an entry gets; the order of the checks is part of the scheme."""
  *parents, leaf = name.split(".")
  module = parents[-1] if parents else ""
  if leaf == "num_batches_tracked":
    return "counter"
  if leaf in ("running_mean", "running_var"):
    return leaf
  if _is_norm(module, name, leaf) and leaf in ("weight", "bias"):
    return f"norm_{leaf}"
  if leaf == "weight" and (module.endswith("_lt") or "embed" in module.lower()):
    return "embedding"
  if leaf.endswith("weight") and len(shape) >= 2:
    return "fan_in_normal"
  if leaf.endswith("bias"):
    return "bias"
  raise ValueError(f"the weight scheme has no rule for {name} {shape}")


_TRANSFORMS = {
    "running_mean": lambda z, shape: 0.1 * z,
    "running_var": lambda z, shape: 1.0 + 0.1 * np.abs(z),
    "norm_weight": lambda z, shape: 1.0 + 0.1 * z,
    "norm_bias": lambda z, shape: 0.1 * z,
    "embedding": lambda z, shape: 0.02 * z,
    "fan_in_normal": lambda z, shape: z * math.sqrt(2.0 / math.prod(shape[1:])),
    "bias": lambda z, shape: 0.02 * z,
}


def synthetic_state_dict(spec_path: str, seed: int) -> dict[str, np.ndarray]:
  """name -> array (torch layout) for every entry of the spec, in spec order."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape, dtype in read_spec(spec_path):
    rule = rule_for(name, shape)
    if rule == "counter":
      weights[name] = np.zeros(shape, np.int64)
      continue
    z = rng.standard_normal(size=shape)
    weights[name] = _TRANSFORMS[rule](z, shape).astype(dtype)
  return weights


def sha256_fingerprint(weights: dict[str, np.ndarray]) -> str:
  """sha256 over (UTF-8 name, C-order bytes) of each entry, in order."""
  digest = hashlib.sha256()
  for name, value in weights.items():
    digest.update(name.encode("utf-8"))
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()
