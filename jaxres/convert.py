"""PyTorch `state_dict` <-> Flax variables for the jaxres models.

The PyTorch twin of a jaxres model (`benchmarks/torch_reference.py` has one for the
custom ResNet) names its modules exactly as the Flax tree does, so the mapping is
mechanical. A Flax variable at path `a/b/c/<leaf>` is the PyTorch entry `a.b.c.<name>`:

    Flax (collection, leaf)          PyTorch name          layout
    params      .../kernel (4-D)     .../weight            HWIO  <->  OIHW   (Conv2d)
    params      .../kernel (2-D)     .../weight            (in, out) <-> (out, in)  (Linear)
    params      .../bias             .../bias              same
    params      .../scale            .../weight            same  (BatchNorm2d / GroupNorm)
    batch_stats .../mean             .../running_mean      same
    batch_stats .../var              .../running_var       same
    (none)                           .../num_batches_tracked   ignored on import, 0 on export

One renaming: jaxres wraps GroupNorm in a module that picks the group count
(`_GroupNormAuto`, itself named `norm`, whose inner `nn.GroupNorm` is also `norm`), so
the Flax path `.../norm/norm/scale` is the PyTorch `.../norm.weight`, the same name a
BatchNorm would have. For the custom ResNet the names are, for example:

    prep.conv_block.conv.weight            [64, 3, 3, 3]
    prep.conv_block.norm.weight            [64]           (and .bias, .running_mean, ...)
    layer1.conv_block.conv.weight          [128, 64, 3, 3]
    layer1.res1.conv.weight, layer1.res1.norm.weight, layer1.res2.conv.weight, ...
    layer2.conv_block.conv.weight          [256, 128, 3, 3]
    layer3.conv_block..., layer3.res1..., layer3.res2...
    classifier.weight                      [10, 512]      (and classifier.bias [10])

Neither direction needs PyTorch: tensors are read duck-typed (`.detach().cpu().numpy()`)
and exported as NumPy arrays unless `tensors=True` is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxres.errors import JaxresError
from jaxres.models import init_variables

NUM_BATCHES_TRACKED = "num_batches_tracked"

# Flax leaf name -> PyTorch parameter/buffer name, per collection.
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def _template(model) -> dict:
    """Shapes and dtypes of `model`'s params (and batch_stats), without computing anything."""
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


def _module_path(flax_path: tuple[str, ...]) -> tuple[str, ...]:
    """Flax module path -> PyTorch module path (collapses the GroupNorm wrapper `norm/norm`)."""
    parts: list[str] = []
    for part in flax_path:
        if part == "norm" and parts and parts[-1] == "norm":
            continue
        parts.append(part)
    return tuple(parts)


def _torch_name(collection: str, flax_path: tuple[str, ...]) -> str:
    *module, leaf = flax_path
    names = _PARAM_NAMES if collection == "params" else _STAT_NAMES
    if leaf not in names:
        raise JaxresError(f"no PyTorch name for the Flax variable {collection}/{'/'.join(flax_path)}")
    return ".".join((*_module_path(tuple(module)), names[leaf]))


def _to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:  # (in, out) -> (out, in)
        return array.T
    return array


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # (out, in) -> (in, out)
        return array.T
    return array


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _as_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor (duck-typed), JAX array or array-like."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.array(value)


def _name_table(model) -> tuple[dict[str, tuple[str, tuple[str, ...], Any]], set[str]]:
    """{torch name: (collection, flax path, ShapeDtypeStruct)} and the BatchNorm module names."""
    template = _template(model)
    table = {}
    batch_norm_modules = set()
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(template.get(collection, {})).items():
            name = _torch_name(collection, path)
            if name in table:  # two Flax variables would collide: the naming rule is broken
                raise JaxresError(f"two Flax variables map to the PyTorch name {name!r}")
            table[name] = (collection, path, leaf)
            if collection == "batch_stats":
                batch_norm_modules.add(name.rsplit(".", 1)[0])
    return table, batch_norm_modules


def _check_names(missing: list[str], unexpected: list[str], kind: str, what: str) -> None:
    """Raise JaxresError `what: missing {kind}(s): ...; unexpected {kind}(s): ...` if any."""
    problems = [f"{label} {kind}(s): {', '.join(names)}" for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if problems:
        raise JaxresError(f"{what}: " + "; ".join(problems))


def torch_to_flax(state_dict: Mapping[str, Any], model) -> dict:
    """A PyTorch `state_dict` of `model`'s twin -> Flax `{"params", ["batch_stats"]}`.

    state_dict: name -> torch.Tensor or array (names as in the module docstring);
    model: the jaxres Flax module whose structure the result must have. `batch_stats`
    is present only when the model has BatchNorm (as `models.init_variables` returns).
    `num_batches_tracked` entries of BatchNorm layers are ignored. Returns float arrays
    in the template's dtype (float32), as JAX arrays.

    Raises JaxresError naming the key(s) on missing or unexpected entries, or a shape
    that does not match the model.
    """
    table, batch_norm_modules = _name_table(model)
    expected_extra = {f"{module}.{NUM_BATCHES_TRACKED}" for module in batch_norm_modules}
    missing = sorted(set(table) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(table) - expected_extra)
    _check_names(missing, unexpected, "key", f"state_dict does not match {type(model).__name__}")

    flat: dict[str, dict[tuple[str, ...], jax.Array]] = {}
    for name, (collection, path, leaf) in table.items():
        array = _as_numpy(state_dict[name])
        expected = _torch_shape(leaf.shape, path[-1])
        if tuple(array.shape) != expected:
            raise JaxresError(
                f"state_dict[{name!r}] has shape {tuple(array.shape)}, but the model needs {expected}"
            )
        flat.setdefault(collection, {})[path] = jnp.asarray(_to_flax_layout(array, path[-1]), leaf.dtype)
    return {collection: traverse_util.unflatten_dict(values) for collection, values in flat.items()}


def flax_to_torch(variables: Mapping[str, Any], model, tensors: bool = False) -> dict[str, Any]:
    """Flax `{"params", ["batch_stats"]}` of `model` -> a PyTorch `state_dict` of its twin.

    Returns name -> float32 NumPy array (C-contiguous; float64 variables stay float64, for
    numerical reference checks), plus `num_batches_tracked = 0`
    (int64) for every BatchNorm layer. With `tensors=True`, torch tensors instead
    (imports torch), ready for `module.load_state_dict`. Other collections in
    `variables` (e.g. `perturbations`) are ignored.

    Raises JaxresError naming the variable on missing or unexpected variables or a shape
    that does not match the model.
    """
    table, batch_norm_modules = _name_table(model)
    given = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
            given[(collection, path)] = value
    expected = {(collection, path): (name, leaf) for name, (collection, path, leaf) in table.items()}
    missing = sorted("/".join((c, *p)) for c, p in set(expected) - set(given))
    unexpected = sorted("/".join((c, *p)) for c, p in set(given) - set(expected))
    _check_names(missing, unexpected, "variable", f"variables do not match {type(model).__name__}")

    state_dict: dict[str, Any] = {}
    for (collection, path), (name, leaf) in expected.items():
        array = _as_numpy(given[(collection, path)])
        if tuple(array.shape) != tuple(leaf.shape):
            raise JaxresError(
                f"variable {collection}/{'/'.join(path)} has shape {tuple(array.shape)}, "
                f"but the model needs {tuple(leaf.shape)}"
            )
        dtype = np.float64 if array.dtype == np.float64 else np.float32
        state_dict[name] = np.ascontiguousarray(_to_torch_layout(array, path[-1]), dtype=dtype)
    for module in sorted(batch_norm_modules):
        state_dict[f"{module}.{NUM_BATCHES_TRACKED}"] = np.zeros((), np.int64)
    if tensors:
        import torch

        state_dict = {name: torch.from_numpy(array) for name, array in state_dict.items()}
    return state_dict
