"""The layers jaxres's models are built of, beside flax's own: max-pools that floor odd sizes
and send the gradient as PyTorch does, and the normalisations (BatchNorm with PyTorch's
defaults and float32 statistics, ghost BatchNorm, group and layer norm), each a pure Flax
Linen module or function; `norm_factory` gives a model the factory of the one it asks for.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxres.config import NORMS, check_choice
from jaxres.errors import JaxresError

ModuleDef = Any  # a flax module class, or a functools.partial of one (as in the Flax examples)
GHOST_BATCH_SIZE = 32  # images per virtual batch of the "ghost_batch" norm


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2.  T[N,H,W,C] -> T[N,H//2,W//2,C].

    An odd H or W loses its last row or column, as `torch.nn.functional.max_pool2d(x, 2)`
    floors (a 28x28 image pools to 14, 7, then 3); their gradient is zero. The gradient goes
    to the first maximum of each window in row-major order, as PyTorch's max_pool2d sends it
    (JAX's own rule for `max` splits it between tied maxima, and needs a reduction to count
    them); cheaper on CPU than reduce_window's select-and-scatter too.
    """
    return max_pool_floor(x, 2)


def max_pool_floor(x: jax.Array, size: int) -> jax.Array:
    """size x size max-pool with stride `size`, dropping the rows and columns that do not fill a
    window (PyTorch's nn.MaxPool2d(size) on sizes that are not multiples), the gradient sent
    to the first maximum of each window in row-major order, as PyTorch's (`max_pool_2x2`).
    T[N, H, W, C] -> T[N, H // size, W // size, C].

    Tied maxima are common in real images (flat regions, and exact zeros where ReLU, or PyTorch's
    GELU, saturates); splitting the gradient between them, JAX's rule for `max`, gives different
    convolution gradients from PyTorch's on the same weights and batch (benchmarks/README.md,
    "Where the two differ")."""
    height, width = x.shape[1] // size * size, x.shape[2] // size * size
    if (height, width) != tuple(x.shape[1:3]):
        x = x[:, :height, :width]
    return _max_pool_first(x, size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_first(x: jax.Array, size: int) -> jax.Array:
    """`max_pool_floor` of H and W that are multiples of `size`, as a reshape and a max."""
    return _pool_windows(x, size).max(axis=(2, 4))


def _pool_windows(x, size):
    n, height, width, channels = x.shape
    return x.reshape(n, height // size, size, width // size, size, channels)


def _max_pool_first_forward(x, size):
    pooled = _pool_windows(x, size).max(axis=(2, 4))
    return pooled, (x, pooled)


def _max_pool_first_backward(size, residuals, g):
    x, pooled = residuals
    hits = _pool_windows(x, size) == pooled[:, :, None, :, None, :]
    taken = jnp.zeros_like(hits[:, :, 0, :, 0])
    first = []
    for dy in range(size):  # the window in row-major order
        for dx in range(size):
            hit = hits[:, :, dy, :, dx] & ~taken
            first.append(hit)
            taken = taken | hit
    mask = jnp.stack(first, axis=-2).reshape(*pooled.shape[:3], size, size, pooled.shape[3])  # [N, H/s, W/s, dy, dx, C]
    gradient = jnp.where(mask, g[:, :, :, None, None, :], jnp.zeros((), g.dtype))
    return (gradient.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape),)


_max_pool_first.defvjp(_max_pool_first_forward, _max_pool_first_backward)


def norm_factory(norm: str, dtype: Any, train: bool) -> ModuleDef:
    """The factory of the normalisation layer `norm` in {batch, group, layer, ghost_batch}:
    call it with a `name` for the layer.

    BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9, eps 1e-5);
    its statistics and running averages stay float32 whatever `dtype` computes.
    GroupNorm uses gcd(32, channels) groups; "layer" normalises over H, W and C
    with a per-channel affine (GroupNorm with one group, as PyTorch's LayerNorm on CHW).
    "ghost_batch" is BatchNorm over virtual batches of GHOST_BATCH_SIZE images
    (`GhostBatchNorm`), with the same variables as "batch".
    """
    check_choice("norm", norm, NORMS)
    if norm == "batch":
        return functools.partial(BatchNorm, use_running_average=not train, dtype=dtype)
    if norm == "ghost_batch":
        return functools.partial(GhostBatchNorm, use_running_average=not train, ghost_size=GHOST_BATCH_SIZE, dtype=dtype)
    if norm == "group":
        return functools.partial(_GroupNormAuto, num_groups_max=32, dtype=dtype)
    if norm == "layer":
        return functools.partial(_GroupNormAuto, num_groups_max=1, dtype=dtype)
    raise AssertionError(f"norm {norm!r} is in config.NORMS but has no layer here")


def row_means(x: jax.Array) -> jax.Array:
    """The mean over rows of x: float[M, C] -> float[C], as matrix-vector products.

    XLA:CPU rewrites a plain `jnp.mean` over M = N*H*W rows into a reduce-window over the
    batch (its tree-reduction pass), a naive loop that takes a seventh of the train step's
    traced time (benchmarks/README.md, "What each change gained"); a product with a ones
    vector is one optimised call. One product over all M rows would add them one after
    another, though (relative error 8e-6 on 131,072 rows, 100 times jnp.mean's), so the rows
    are summed in up to 32 contiguous blocks (a batched product) whose sums are then added:
    6e-7, and on several devices each block stays on one.
    """
    rows, channels = x.shape
    blocks = math.gcd(rows, 32)
    weights = jnp.full((blocks, rows // blocks), 1.0 / rows, x.dtype)
    block_sums = jax.lax.dot_general(
        weights, x.reshape(blocks, rows // blocks, channels), (((1,), (1,)), ((0,), (0,))),
        precision=jax.lax.Precision.HIGHEST,  # float32 sums on a GPU too, not TF32 (the CPU's are anyway)
    )  # fmt: skip
    return block_sums.sum(axis=0)


@jax.custom_vjp
def batch_norm_rows(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """BatchNorm's training forward over rows: x: float[M, C] -> (y float[M, C], mean float[C],
    var float[C]), the biased variance computed from the centred rows (two passes).

    Sums are `row_means`, forward and in the hand-written backward (BatchNorm's usual
    gradient; the statistics' own cotangents are ignored: they only feed the running
    averages, never a loss).
    """
    return _batch_norm_rows_forward(x, scale, bias, epsilon)[0]


def _batch_norm_rows_forward(x, scale, bias, epsilon):
    mean = row_means(x)
    centred = x - mean
    var = row_means(jnp.square(centred))
    inverse_std = jax.lax.rsqrt(var + epsilon)
    return (centred * (inverse_std * scale) + bias, mean, var), (centred, inverse_std, scale)


def _batch_norm_rows_backward(residuals, cotangents):
    centred, inverse_std, scale = residuals
    g = cotangents[0]
    rows = centred.shape[0]
    bias_gradient = rows * row_means(g)
    scale_gradient = rows * inverse_std * row_means(g * centred)  # sum over rows of g * (x - mean) / std
    x_gradient = (inverse_std * scale) * (
        g - bias_gradient / rows - centred * (inverse_std * scale_gradient / rows)
    )
    return x_gradient, scale_gradient, bias_gradient, None


batch_norm_rows.defvjp(_batch_norm_rows_forward, _batch_norm_rows_backward)


def _batch_norm_variables(module: nn.Module, channels: int) -> tuple:
    """flax.linen.BatchNorm's variables, declared in `module`: (params scale float32[C] = 1,
    bias = 0, batch_stats mean = 0, var = 1), the last two as flax variables. Without
    `module.use_scale` the scale is the constant 1, not a parameter (airbench's BatchNorm,
    whose weight PyTorch keeps at 1 with requires_grad=False)."""
    if getattr(module, "use_scale", True):
        scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    else:
        scale = jnp.ones((channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    running_var = module.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    return scale, bias, running_mean, running_var


def _update_running_averages(module: nn.Module, running_mean, running_var, mean, var, count: int) -> None:
    """new = momentum * old + (1 - momentum) * batch value (flax's convention), after init.

    `var` is the biased variance of `count` values per channel (the one that normalised
    them); the running variance takes the unbiased one, var * count / (count - 1), as
    PyTorch's BatchNorm does (flax.linen.BatchNorm keeps the biased one)."""
    if not module.is_initializing():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        running_mean.value = module.momentum * running_mean.value + (1 - module.momentum) * mean
        running_var.value = module.momentum * running_var.value + (1 - module.momentum) * unbiased


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's defaults (momentum 0.1, i.e. 0.9 here as flax counts it; eps
    1e-5) and flax.linen.BatchNorm's variables (params scale, bias; batch_stats mean, var:
    float32[C]), so checkpoints and `jaxres.convert` see no difference. Training statistics
    come from `batch_norm_rows` over (N, H, W), in float32 (or float64 for float64 inputs)
    whatever `dtype` computes; the running variance moves towards the unbiased batch variance,
    as PyTorch's does. The output has `dtype`. x: float[N, H, W, C]."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    use_scale: bool = True  # False: no learned scale (a constant 1)

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale, bias, running_mean, running_var = _batch_norm_variables(self, channels)
        wide = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            multiplier = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
            return ((wide - running_mean.value) * multiplier + bias).astype(self.dtype)
        y, mean, var = batch_norm_rows(wide.reshape(-1, channels), scale, bias, self.epsilon)
        _update_running_averages(self, running_mean, running_var, mean, var, count=math.prod(x.shape[:-1]))
        return y.reshape(x.shape).astype(self.dtype)


class _GroupNormAuto(nn.Module):
    """GroupNorm whose group count is gcd(num_groups_max, channels)."""

    num_groups_max: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        groups = math.gcd(self.num_groups_max, x.shape[-1])
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, name="norm")(x)


class GhostBatchNorm(BatchNorm):
    """BatchNorm whose training statistics come from virtual ("ghost") sub-batches.

    Hoffer et al. 2017, "Train longer, generalize better". In training, the batch
    x: float[N, H, W, C] is split in order into N / ghost_size consecutive groups of
    `ghost_size` images (N <= ghost_size: one group, i.e. plain BatchNorm); each group is
    normalised with its own mean and (biased) variance over (images, H, W). The running
    averages move towards the mean over groups of those means and of the unbiased variances (momentum
    as flax: new = momentum * old + (1 - momentum) * batch value; 0.9 is PyTorch's 0.1).
    In inference, the running averages normalise, exactly as BatchNorm. The variables
    are BatchNorm's (params scale, bias; batch_stats mean, var: float32[C]), so
    checkpoints move between "batch" and "ghost_batch". Statistics are float32; the
    output has `dtype`. N must be a multiple of ghost_size when larger than it.
    """

    ghost_size: int = GHOST_BATCH_SIZE  # besides BatchNorm's fields

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale, bias, running_mean, running_var = _batch_norm_variables(self, channels)
        x32 = jnp.asarray(x, jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            n = x.shape[0]
            groups = 1 if n <= self.ghost_size else n // self.ghost_size
            if n > self.ghost_size and n % self.ghost_size:
                raise JaxresError(
                    f"ghost_batch norm needs a batch size that is a multiple of {self.ghost_size} "
                    f"(or at most {self.ghost_size}), got {n}"
                )
            grouped = x32.reshape(groups, n // groups, *x.shape[1:])
            axes = tuple(range(1, grouped.ndim - 1))
            group_mean = jnp.mean(grouped, axis=axes, keepdims=True)
            group_var = jnp.mean(jnp.square(grouped - group_mean), axis=axes, keepdims=True)
            normalized = (grouped - group_mean) * jax.lax.rsqrt(group_var + self.epsilon)
            batch_mean = group_mean.reshape(groups, channels).mean(axis=0)
            batch_var = group_var.reshape(groups, channels).mean(axis=0)
            _update_running_averages(
                self, running_mean, running_var, batch_mean, batch_var, count=math.prod(grouped.shape[1:-1])
            )  # fmt: skip
            return (normalized.reshape(x.shape) * scale + bias).astype(self.dtype)
        normalized = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normalized * scale + bias).astype(self.dtype)
