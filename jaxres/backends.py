"""The convolution backend of a run: resolved once, before any model is built, into a value.

`TrainConfig.conv_backend` is a choice ("auto", "xla", "onednn"); `resolve` turns it into a
`ConvBackend`, whose `conv` is the flax convolution factory the models take
(`models.create_model(..., conv=backend.conv)`), and `model_from_config` builds a run's model
with it. `TrainConfig.conv_algorithm` "winograd" puts Winograd's 3x3 convolutions
(`jaxres.winograd`) over it (`with_algorithm`); `for_config` does both. The choice is made here rather than in jaxres.models because making it may build
oneDNN's library (g++), reads the devices and may print why oneDNN could not be had: the
models stay plain modules, and building one has no side effects.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import flax.linen as nn
import jax

from jaxres import models, onednn, precision, winograd
from jaxres.config import CONV_ALGORITHMS, CONV_BACKENDS, check_choice
from jaxres.errors import JaxresError
from jaxres.models import ModuleDef


@functools.cache  # the documented cache: one factory per function
def conv_factory(conv_general_dilated: Callable) -> ModuleDef:
    """flax's nn.Conv computing with `conv_general_dilated` (`jax.lax.conv_general_dilated`'s
    signature). XLA's own is nn.Conv itself, the models' default; any other is one
    `functools.partial` per function, so that two models built with the same backend compare
    and hash equal (a partial compares by identity) and share their compiled programs."""
    if conv_general_dilated is jax.lax.conv_general_dilated:
        return nn.Conv
    return functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


@dataclasses.dataclass(frozen=True)
class ConvBackend:
    """A resolved convolution backend: its `name` ("xla" or "onednn", with "+winograd" under
    `with_algorithm`: what a run records) and the `conv_general_dilated` that computes its
    convolutions."""

    name: str
    conv_general_dilated: Callable

    @property
    def conv(self) -> ModuleDef:
        """The convolution factory a model takes (`conv_factory`)."""
        return conv_factory(self.conv_general_dilated)


XLA = ConvBackend("xla", jax.lax.conv_general_dilated)  # XLA's own convolutions, on every platform


def resolve(choice: str, library: onednn.Onednn | None = None) -> ConvBackend:
    """The backend `choice` (one of `CONV_BACKENDS`) names in this process.

    "xla" is `XLA`. "auto" is oneDNN's (`library`, by default `onednn.default()`) when JAX
    runs on the CPU with one device in one process and the library loads, else `XLA`; on a
    CPU it tells stderr why oneDNN could not be had, once per library. "onednn" is oneDNN's,
    or a JaxresError saying why it cannot be had. On a GPU or TPU "auto" is `XLA` without a
    word: XLA's convolutions are what a user expects there.
    """
    check_choice("conv_backend", choice, CONV_BACKENDS)
    if choice == "xla":
        return XLA
    if jax.default_backend() != "cpu":
        if choice == "onednn":
            raise JaxresError(f"conv_backend onednn is for the CPU, JAX runs on {jax.default_backend()}")
        return XLA
    if jax.device_count() > 1:
        if choice == "onednn":
            raise JaxresError(
                f"conv_backend onednn needs a single device, JAX has {jax.device_count()} (its FFI calls have "
                "no sharding rule); use conv_backend xla or auto"
            )
        return XLA
    library = onednn.default() if library is None else library
    reason = library.unavailable_reason
    if reason is None:
        return ConvBackend("onednn", library.conv_general_dilated)
    if choice == "onednn":
        raise JaxresError(f"conv_backend onednn is not available: {reason}")
    if not library.told:
        print(f"jaxres: XLA's convolutions, not oneDNN's: {reason}", file=sys.stderr)
        library.told = True
    return XLA


def with_algorithm(backend: ConvBackend, algorithm: str, platform: str | None = None) -> ConvBackend:
    """`backend` computing its convolutions by `algorithm` (one of `CONV_ALGORITHMS`): "direct"
    is `backend` itself; "winograd" takes the float32 3x3 stride-1 convolutions
    (`winograd.handles`) by Winograd's F(4x4, 3x3) and leaves the rest to `backend`; "auto"
    is "winograd" on the CPU and "direct" elsewhere (`platform`, by default JAX's: a GPU's
    cuDNN picks its own algorithms, Winograd's among them)."""
    check_choice("conv_algorithm", algorithm, CONV_ALGORITHMS)
    if algorithm == "auto":
        algorithm = "winograd" if (platform or jax.default_backend()) == "cpu" else "direct"
    if algorithm == "direct":
        return backend
    return ConvBackend(f"{backend.name}+winograd", winograd.conv_general_dilated_with(backend.conv_general_dilated))


def for_config(config, library: onednn.Onednn | None = None) -> ConvBackend:
    """The backend a run's config names: `resolve(config.conv_backend)` by
    `config.conv_algorithm` (`with_algorithm`)."""
    return with_algorithm(resolve(config.conv_backend, library), config.conv_algorithm)


def model_from_config(config, num_classes: int, backend: ConvBackend | None = None) -> nn.Module:
    """The model a run's `jaxres.config.TrainConfig` describes (model, width, norm, the compute
    dtype of its precision), with `num_classes` outputs, computing its convolutions with
    `backend` (by default `for_config(config)`)."""
    backend = for_config(config) if backend is None else backend
    return models.create_model(
        config.model,
        num_classes=num_classes,
        width=config.width,
        norm=config.norm,
        dtype=precision.compute_dtype(config.precision),
        conv=backend.conv,
    )
