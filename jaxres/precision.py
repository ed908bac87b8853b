"""Mixed-precision policies and the dynamic loss scale, as pure state.

Parameters and optimizer state are always float32; `compute_dtype` is what the
model's convolutions and matmuls run in. BatchNorm statistics stay float32 (Flax
computes them in float32 and keeps running averages in the parameter dtype).

fp16 needs loss scaling: the loss is multiplied by `scale` before differentiation and
the gradients divided by it after. When any gradient (or the loss) is not finite, the
step is skipped (the caller keeps the old params, optimizer state and BN statistics with
`select_tree`) and the scale halves; on the `growth_interval`-th finite step in a row it
doubles. That is PyTorch's GradScaler (`torch._amp_update_scale_`), step for step.

Why not `flax.training.dynamic_scale.DynamicScale`: it grows the scale one step later
(when the count of finite steps *before* this one already equals `growth_interval`, so on
the interval + 1-th), and it judges a step by its gradients alone. jaxres reproduces the
PyTorch recipe step for step (the parity tests train the PyTorch twin beside it), so the
loss scale follows GradScaler's rule; tests/test_precision.py runs all three on one
sequence of finite and overflowing steps. `LossScale` is a NamedTuple, a pytree, as
DynamicScale is: it rides in the train state through `lax.scan`.
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
    """Dynamic loss-scale state. scale: float32[]; good_steps: int32[] (finite steps in a row
    since the last change; GradScaler's growth tracker). See the module docstring for why it
    is not flax's DynamicScale."""

    scale: jax.Array
    good_steps: jax.Array


def init_loss_scale(initial_scale: float) -> LossScale:
    """The loss scale at the start of an fp16 run: `initial_scale`, no finite steps yet."""
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
