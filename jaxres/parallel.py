"""Devices: joining a multi-host run, the mesh over every device, replicated arrays.

Data parallelism in jaxres: every array lives on a 1-D `Mesh` named `batch` over all
devices (all processes' devices in a multi-host run, see `initialize_distributed`). The
dataset and the training state are replicated; each batch is constrained to be split over
the `batch` axis, so every device computes its share and XLA inserts the all-reduce of the
gradients and of the BatchNorm statistics (synchronised BatchNorm: the result equals one
device's).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None):
    """Join a multi-host run through `jax.distributed.initialize` (no-op for one process).

    On CPU the collectives go through gloo. Must run before any other JAX call.
    """
    if num_processes is None or num_processes <= 1:
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option absent on some builds; GPU/TPU do not need it
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh() -> Mesh:
    """A 1-D mesh named `batch` over every device of every process."""
    return Mesh(np.array(jax.devices()), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device: every process can read every output (multi-host)."""
    return NamedSharding(mesh, P())


def replicate(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """Place a host array on every device of the mesh (works across processes)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def replicate_tree(mesh: Mesh, tree):
    """`replicate` every leaf of a pytree of host (or device) arrays."""
    return jax.tree_util.tree_map(lambda x: replicate(mesh, np.asarray(x)), tree)
