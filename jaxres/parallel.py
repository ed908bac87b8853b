"""Devices: joining a multi-host run, the mesh over every device, replicated arrays, and how
loops run on this backend.

Data parallelism in jaxres: every array lives on a 1-D `Mesh` named `batch` over all
devices (all processes' devices in a multi-host run, see `initialize_distributed`). The
dataset and the training state are replicated; each batch is constrained to be split over
the `batch` axis, so every device computes its share and XLA inserts the all-reduce of the
gradients and of the BatchNorm statistics (synchronised BatchNorm: the result equals one
device's).
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.extend import core as jax_core
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


def resolve_epoch_loop(epoch_loop: str, trace_step=None) -> str:
    """"scan" or "steps" for `epoch_loop` in {auto, scan, steps}.

    auto is scan (the epoch as one program) off the CPU. On the CPU it is scan when one
    step has no XLA convolution, i.e. when oneDNN computes all of them (`jaxres.onednn`),
    and steps (a host loop of one jitted step) otherwise. `trace_step()` returns the
    step's `ClosedJaxpr`; without it auto on CPU is steps. Why (2-core AMD EPYC, width
    0.25, benchmarks/README.md): XLA:CPU runs its own convolutions inside a while loop
    (which `lax.scan` becomes) ~17-25x slower than outside one (jax-ml/jax#12868), while
    with oneDNN's convolutions the scanned epoch is ~1.15x the host loop's speed. (Part of
    that is the host's dispatch between steps, ~3 % of a step in a profile; the rest is
    not pinned down.)
    """
    if epoch_loop != "auto":
        return epoch_loop
    if jax.default_backend() != "cpu":
        return "scan"
    if trace_step is None or xla_convolutions(trace_step()):
        return "steps"
    return "scan"


def xla_convolutions(closed_jaxpr) -> int:
    """How many `conv_general_dilated` (XLA convolutions) a jaxpr holds, sub-jaxprs included."""
    return primitive_counts(closed_jaxpr)["conv_general_dilated"]


def primitive_counts(closed_jaxpr) -> collections.Counter:
    """{primitive name: how many times it occurs} in a jaxpr, sub-jaxprs included (the bodies
    of scans, conditionals, custom_vjp rules, pjit calls)."""
    counts = collections.Counter()
    pending = [closed_jaxpr.jaxpr]
    while pending:
        jaxpr = pending.pop()
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for param in eqn.params.values():
                for value in param if isinstance(param, (list, tuple)) else (param,):
                    if isinstance(value, jax_core.ClosedJaxpr):
                        pending.append(value.jaxpr)
                    elif isinstance(value, jax_core.Jaxpr):
                        pending.append(value)
    return counts


class LoopChoice:
    """An epoch (or evaluation) function built for the loop `resolve_epoch_loop` picks, which
    may need the step traced on real arguments: `build(loop)` is called on the first call,
    `trace(*args)` returns the step's `ClosedJaxpr` for those arguments. `loop` is the
    choice ("scan" or "steps"), None before the first call."""

    def __init__(self, epoch_loop: str, build, trace):
        self.epoch_loop, self.build, self.trace = epoch_loop, build, trace
        self.loop = None
        self.function = None

    def __call__(self, *args):
        if self.function is None:
            self.loop = resolve_epoch_loop(self.epoch_loop, lambda: self.trace(*args))
            self.function = self.build(self.loop)
        return self.function(*args)
