"""Device mesh, array layout and global batches: the only place that knows how arrays are laid out.

Mesh: axes ``("data", "fsdp")`` of sizes (N / F, F) over the N devices of all processes,
F = ``config.mesh.fsdp`` (1: pure data parallel; -1: F = N). `jax.make_mesh` orders the
devices (CPU/GPU: grouped by process; TPU: by the physical topology), so with F dividing
the devices per host the ``fsdp`` groups stay inside a host, on its fast interconnect, and
``data`` spans hosts.

Batch: split over both axes, ``PartitionSpec(("data", "fsdp"))``, so every device holds
B / N distinct rows. Each process feeds the rows of its own devices (B * local / N) and
`jax.make_array_from_process_local_data` assembles the global batch; the same code runs
on one CPU, one GPU host or a pod.

Parameters, BatchNorm statistics and optimizer state (FSDP, ZeRO-3 style): a leaf is split
over ``fsdp`` along its largest dimension whose size F divides (on a tie, the last such
dimension, a kernel's output features) and replicated over ``data``. A leaf with fewer
than ``min_size`` elements, or with no dimension F divides, is replicated: splitting a
bias or a 64-channel BatchNorm vector saves nothing and costs a collective. The rule reads
shapes only, so Adam's moments follow their parameters and a checkpoint restores onto any
mesh. Inside the jitted step (explicit in/out shardings, Auto mesh axes) GSPMD inserts the
collectives: all-gathers before a weight is used, reductions of its gradient onto its
shards; a mean over the batch axis (loss, BatchNorm statistics) is a mean over the global
batch, whatever the mesh (tests/test_scale.py checks both).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ctran_jax import watchdog

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(num_devices: int = -1, fsdp: int = 1) -> Mesh:
  """A ``(data, fsdp)`` mesh over `num_devices` devices (-1: all, across all hosts)."""
  available = jax.device_count()
  n = available if num_devices in (-1, None) else num_devices
  if not 1 <= n <= available:
    raise ValueError(f"config.mesh.num_devices={num_devices}, but {available} devices exist")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"config.mesh.num_devices={num_devices} in a {jax.process_count()}-"
                     f"process run: every process must feed the mesh; use -1 (all {available})")
  f = n if fsdp == -1 else fsdp
  if not isinstance(f, int) or f < 1 or n % f:
    raise ValueError(f"config.mesh.fsdp={fsdp}; expected -1 or a divisor of the {n} devices")
  # Auto axes: GSPMD propagation (jax 0.10 makes Explicit axes by default).
  return jax.make_mesh((n // f, f), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every device: ``data`` and ``fsdp`` both split the batch."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def leaf_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
  """The FSDP rule for one array shape (see the module docstring)."""
  if fsdp_size == 1 or math.prod(shape) < max(min_size, 1):
    return PartitionSpec()
  divisible = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda i: (shape[i], i))
  return PartitionSpec(*(FSDP if i == axis else None for i in range(len(shape))))


def state_shardings(tree, mesh: Mesh, min_size: int):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by the FSDP rule;
  `min_size` is ``config.mesh.fsdp_min_size``."""
  if not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"config.mesh.fsdp_min_size={min_size!r}; expected an integer >= 0")
  size = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), size, min_size)),
                      tree)


def local_batch_size(global_batch_size: int, mesh: Mesh, key: str = "batch_size") -> int:
  """Rows this process feeds: the global batch must split evenly over the mesh's devices.

  `key` names the config entry the batch size came from, for the error message.
  """
  devices = mesh.devices.size
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"config.{key}={global_batch_size!r}; expected a positive integer")
  if global_batch_size % devices:
    raise ValueError(f"config.{key}={global_batch_size} is not divisible by the {devices} "
                     f"devices of the mesh; choose a multiple of {devices}")
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return global_batch_size // devices * local


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy rows -> global arrays with rows split over all devices.

  Every training and evaluation batch passes here: it is the progress the step watchdog
  (``--step_timeout``) waits for.
  """
  watchdog.pet()
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1 or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
