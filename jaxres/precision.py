"""Mixed-precision policies and the dynamic loss scale, as pure state.

Parameters and optimizer state are always float32; `compute_dtype` is what the
model's convolutions and matmuls run in. BatchNorm statistics stay float32 (Flax
computes them in float32 and keeps running averages in the parameter dtype).

fp16 needs loss scaling: the loss is multiplied by `scale` before differentiation and
the gradients divided by it after. When any gradient is not finite, the step is
skipped (the caller keeps the old params, optimizer state and BN statistics with
`select_tree`) and the scale halves; after `growth_interval` finite steps in a row it
doubles. This is the same rule as `flax.training.dynamic_scale.DynamicScale` and
PyTorch's GradScaler, written as a pytree so it lives inside `lax.scan`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxres.config import PRECISIONS, check_choice

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str):
    """The compute dtype of `precision` in {fp32, bf16, fp16}."""
    check_choice("precision", precision, PRECISIONS)
    return COMPUTE_DTYPES[precision]


class LossScale(NamedTuple):
    """Dynamic loss-scale state. scale: float32[]; good_steps: int32[] (finite steps in a row)."""

    scale: jax.Array
    good_steps: jax.Array


def init_loss_scale(initial_scale: float) -> LossScale:
    return LossScale(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32))


def no_loss_scale() -> LossScale:
    """The identity scale used for fp32/bf16 (kept in the state so all precisions share one step)."""
    return init_loss_scale(1.0)


def all_finite(tree) -> jax.Array:
    """bool[]: every element of every leaf of `tree` is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def update_loss_scale(
    state: LossScale,
    grads_finite: jax.Array,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
) -> LossScale:
    """Next loss-scale state after a step whose gradients were `grads_finite`."""
    good_steps = jnp.where(grads_finite, state.good_steps + 1, 0)
    grow = good_steps >= growth_interval
    scale = jnp.where(
        grads_finite,
        jnp.where(grow, state.scale * growth_factor, state.scale),
        jnp.maximum(state.scale * backoff_factor, min_scale),
    )
    return LossScale(scale.astype(jnp.float32), jnp.where(grow, 0, good_steps).astype(jnp.int32))


def select_tree(condition: jax.Array, on_true, on_false):
    """Leafwise `jnp.where(condition, a, b)` over two pytrees of the same structure."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)
