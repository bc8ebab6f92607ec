"""Device mesh and global batches: the only place that knows how arrays are laid out.

Data parallel for now: the batch is split over the ``data`` mesh axis, parameters and
optimizer state are replicated. Every process feeds its own rows; the global batch is
assembled with `jax.make_array_from_process_local_data`, so the same code runs on one CPU,
one GPU host or a TPU pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D ``data`` mesh over `num_devices` devices (-1: all of them, across all hosts)."""
  available = jax.device_count()
  n = available if num_devices in (-1, None) else num_devices
  if not 1 <= n <= available:
    raise ValueError(f"config.mesh.num_devices={num_devices}, but {available} devices exist")
  # Auto axes: GSPMD propagation (jax 0.10 makes Explicit axes by default).
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows this process feeds; the global batch must split evenly over devices and hosts."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the {devices} devices "
                     f"of the mesh; choose a multiple of {devices}")
  return global_batch_size // jax.process_count()


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy rows -> global arrays sharded over the ``data`` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(tree, mesh: Mesh):
  """Place a pytree fully replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
