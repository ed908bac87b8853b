"""Flax Linen models for 32x32 images: the custom ResNet (ResNet-9) of fast CIFAR-10 training,
and ResNet-18 / ResNet-34 in their usual CIFAR form.

Every model here is a plain Linen module, used purely:

    variables = model.init(key, images, train=False)
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

`images` are float[N, H, W, 3] (already normalised); logits are float32[N, num_classes]
whatever the compute dtype.

The stages are submodules with fixed names (`STAGES`), and each stage's output (its
residual add included) is marked with `Module.perturb` as `perturbations[stage]["output"]`,
so that Grad-CAM can read the activation with `capture_intermediates`
(`intermediates[stage]["__call__"]`) and its gradient with `jax.grad` over the
`perturbations` collection. When no `perturbations` are passed,
`perturb` is the identity and costs nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxres import onednn, precision
from jaxres.config import MODEL_NAMES, NORMS, check_choice
from jaxres.errors import JaxresError
GHOST_BATCH_SIZE = 32  # images per virtual batch of the "ghost_batch" norm

# PyTorch's default initialisation (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance scaling 1/3 on fan_in, uniform.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default bias init for Linear."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2.  T[N,H,W,C] -> T[N,H//2,W//2,C].

    An odd H or W loses its last row or column, as `torch.nn.functional.max_pool2d(x, 2)`
    floors (a 28x28 image pools to 14, 7, then 3); their gradient is zero. The gradient goes
    to the first maximum of each window in row-major order, as PyTorch's max_pool2d sends it
    (JAX's own rule for `max` splits it between tied maxima, and needs a reduction to count
    them); cheaper on CPU than reduce_window's select-and-scatter too.
    """
    height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    if (height, width) != tuple(x.shape[1:3]):
        x = x[:, :height, :width]
    return _max_pool_even(x)


@jax.custom_vjp
def _max_pool_even(x: jax.Array) -> jax.Array:
    """`max_pool_2x2` of even H and W, as a reshape and a max."""
    return _pool_windows(x).max(axis=(2, 4))


def _pool_windows(x):
    n, height, width, channels = x.shape
    return x.reshape(n, height // 2, 2, width // 2, 2, channels)


def _max_pool_2x2_forward(x):
    pooled = _pool_windows(x).max(axis=(2, 4))
    return pooled, (x, pooled)


def _max_pool_2x2_backward(residuals, g):
    x, pooled = residuals
    hits = _pool_windows(x) == pooled[:, :, None, :, None, :]
    taken = jnp.zeros_like(hits[:, :, 0, :, 0])
    first = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the window in row-major order
        hit = hits[:, :, dy, :, dx] & ~taken
        first.append(hit)
        taken = taken | hit
    mask = jnp.stack(first, axis=-2).reshape(*pooled.shape[:3], 2, 2, pooled.shape[3])  # [N, H/2, W/2, dy, dx, C]
    gradient = jnp.where(mask, g[:, :, :, None, None, :], jnp.zeros((), g.dtype))
    return (gradient.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape),)


_max_pool_even.defvjp(_max_pool_2x2_forward, _max_pool_2x2_backward)


def scaled_channels(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def make_norm(norm: str, dtype: Any, train: bool, name: str | None = None) -> nn.Module:
    """The normalisation layer `norm` in {batch, group, layer, ghost_batch}.

    BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9, eps 1e-5);
    its statistics and running averages stay float32 whatever `dtype` computes.
    GroupNorm uses gcd(32, channels) groups; "layer" normalises over H, W and C
    with a per-channel affine (GroupNorm with one group, as PyTorch's LayerNorm on CHW).
    "ghost_batch" is BatchNorm over virtual batches of GHOST_BATCH_SIZE images
    (`GhostBatchNorm`), with the same variables as "batch".
    """
    check_choice("norm", norm, NORMS)
    if norm == "batch":
        return BatchNorm(use_running_average=not train, dtype=dtype, name=name)
    if norm == "ghost_batch":
        return GhostBatchNorm(
            use_running_average=not train, ghost_size=GHOST_BATCH_SIZE, dtype=dtype, name=name
        )
    if norm == "group":
        return _GroupNormAuto(num_groups_max=32, dtype=dtype, name=name)
    if norm == "layer":
        return _GroupNormAuto(num_groups_max=1, dtype=dtype, name=name)
    raise AssertionError(f"norm {norm!r} is in config.NORMS but has no layer here")


def row_means(x: jax.Array) -> jax.Array:
    """The mean over rows of x: float[M, C] -> float[C], as matrix-vector products.

    XLA:CPU rewrites a plain `jnp.mean` over M = N*H*W rows into a reduce-window over the
    batch (its tree-reduction pass), a naive loop that took a seventh of the train step's
    traced time; a product with a ones vector is one optimised call. One product over all M
    rows would add them one after another, though (relative error 8e-6 on 131,072 rows, 100
    times jnp.mean's), so the rows are summed in up to 32 contiguous blocks (a batched
    product) whose sums are then added: 6e-7, and on several devices each block stays on one.
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


def _update_running_averages(module: nn.Module, running_mean, running_var, mean, var) -> None:
    """new = momentum * old + (1 - momentum) * batch value (flax's convention), after init."""
    if not module.is_initializing():
        running_mean.value = module.momentum * running_mean.value + (1 - module.momentum) * mean
        running_var.value = module.momentum * running_var.value + (1 - module.momentum) * var


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's defaults (momentum 0.1, i.e. 0.9 here as flax counts it; eps
    1e-5) and flax.linen.BatchNorm's variables (params scale, bias; batch_stats mean, var:
    float32[C]), so checkpoints and `jaxres.convert` see no difference. Training statistics
    come from `batch_norm_rows` over (N, H, W), in float32 (or float64 for float64 inputs)
    whatever `dtype` computes; the output has `dtype`. x: float[N, H, W, C]."""

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
        _update_running_averages(self, running_mean, running_var, mean, var)
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
    averages move towards the mean over groups of those means and variances (momentum
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
            _update_running_averages(self, running_mean, running_var, batch_mean, batch_var)
            return (normalized.reshape(x.shape) * scale + bias).astype(self.dtype)
        normalized = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normalized * scale + bias).astype(self.dtype)


def conv_function(conv_backend: str) -> Callable:
    """The `conv_general_dilated` that flax's nn.Conv calls for a resolved backend ("xla" or
    "onednn", see `jaxres.onednn.resolve`): oneDNN's for the 3x3 float32 (and, where native,
    bfloat16) convolutions it handles, XLA's otherwise."""
    check_choice("resolved conv_backend", conv_backend, ("xla", "onednn"))
    return onednn.conv_general_dilated if conv_backend == "onednn" else jax.lax.conv_general_dilated


class ConvNormReLU(nn.Module):
    """conv3x3 (no bias) -> [maxpool 2x2] -> norm -> ReLU.  float[N,H,W,C] -> float[N,H',W',features]."""

    features: int
    pool: bool = False
    norm: str = "batch"
    dtype: Any = jnp.float32
    conv_backend: str = "xla"  # resolved: "xla" or "onednn"

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=1,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=torch_default_kernel_init,
            conv_general_dilated=conv_function(self.conv_backend),
            name="conv",
        )(x)
        if self.pool:
            x = max_pool_2x2(x)
        x = make_norm(self.norm, self.dtype, train, name="norm")(x)
        return nn.relu(x)


class ResidualStage(nn.Module):
    """ConvNormReLU(pool) followed, optionally, by a residual block of two ConvNormReLU added to it."""

    features: int
    residual: bool
    pool: bool = True
    norm: str = "batch"
    dtype: Any = jnp.float32
    conv_backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        block = functools.partial(
            ConvNormReLU, self.features, norm=self.norm, dtype=self.dtype, conv_backend=self.conv_backend
        )
        x = block(pool=self.pool, name="conv_block")(x, train)
        if self.residual:
            y = block(name="res1")(x, train)
            y = block(name="res2")(y, train)
            x = x + y
        # Identity unless a `perturbations` collection is passed (see module docstring).
        return self.perturb("output", x)


class CustomResNet(nn.Module):
    """The custom ResNet (ResNet-9) of fast CIFAR-10 training.

    prep:   conv3x3(64) BN ReLU
    layer1: conv3x3(128) maxpool2 BN ReLU, + residual [conv3x3 BN ReLU conv3x3 BN ReLU]
    layer2: conv3x3(256) maxpool2 BN ReLU
    layer3: conv3x3(512) maxpool2 BN ReLU, + residual (512)
    head:   global max-pool (the 4x4 max-pool at 32x32) -> dense(num_classes) -> x 0.125

    `width` scales every channel count; `norm` in {batch, group, layer}; `dtype` is the
    compute dtype (parameters stay float32). At width 1.0 and 10 classes: 6,573,130
    parameters. images: float[N, H, W, 3] -> logits: float32[N, num_classes].
    """

    num_classes: int = 10
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32
    logit_scale: float = 0.125
    conv_backend: str = "xla"  # resolved: "xla" or "onednn" (see jaxres.onednn)

    STAGES: ClassVar[tuple[str, ...]] = ("prep", "layer1", "layer2", "layer3")

    @nn.compact
    def __call__(self, images, train: bool = False):
        channels = lambda c: scaled_channels(c, self.width)  # noqa: E731
        stage = functools.partial(ResidualStage, norm=self.norm, dtype=self.dtype, conv_backend=self.conv_backend)
        x = jnp.asarray(images, self.dtype)
        x = stage(channels(64), residual=False, pool=False, name="prep")(x, train)
        x = stage(channels(128), residual=True, name="layer1")(x, train)
        x = stage(channels(256), residual=False, name="layer2")(x, train)
        x = stage(channels(512), residual=True, name="layer3")(x, train)
        return classifier_head(self, x)


def classifier_head(module: nn.Module, features, pooling: str = "max") -> jax.Array:
    """Global pool ("max" or "avg") -> dense(num_classes) -> x logit_scale, as float32 logits.

    features: float[N, h, w, C] -> float32[N, num_classes]. Called inside `module`'s
    compact `__call__` (which has `num_classes`, `dtype`, `logit_scale`), so the dense
    layer is named `classifier` in its scope.
    """
    pooled = jnp.max(features, axis=(1, 2)) if pooling == "max" else jnp.mean(features, axis=(1, 2))
    fan_in = features.shape[-1]
    logits = nn.Dense(
        module.num_classes,
        dtype=module.dtype,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        name="classifier",
    )(pooled)
    # float32 logits for every low-precision policy (float64 models, used by the numerical
    # reference tests, keep float64)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) * module.logit_scale


class BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016), in the CIFAR form of kuangliu/pytorch-cifar.

    conv3x3(stride) norm ReLU conv3x3 norm, plus the shortcut, then ReLU. The shortcut is
    the identity, or conv1x1(stride) + norm (`shortcut_conv`, `shortcut_norm`) when the
    stride or the channel count changes. Convolutions have no bias.
    float[N, H, W, C] -> float[N, H / stride, W / stride, features].
    """

    features: int
    stride: int = 1
    norm: str = "batch"
    dtype: Any = jnp.float32
    conv_backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(
            nn.Conv, self.features, use_bias=False, dtype=self.dtype, kernel_init=torch_default_kernel_init,
            conv_general_dilated=conv_function(self.conv_backend),
        )
        strides = (self.stride, self.stride)
        y = conv((3, 3), strides=strides, padding=1, name="conv1")(x)
        y = nn.relu(make_norm(self.norm, self.dtype, train, name="norm1")(y))
        y = conv((3, 3), padding=1, name="conv2")(y)
        y = make_norm(self.norm, self.dtype, train, name="norm2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv((1, 1), strides=strides, padding=0, name="shortcut_conv")(x)
            shortcut = make_norm(self.norm, self.dtype, train, name="shortcut_norm")(shortcut)
        return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
    """`blocks` BasicBlocks (`block1`, `block2`, ...); the first has `stride`.

    The stage's output is marked `perturb("output", ...)` as in `ResidualStage`, for Grad-CAM.
    """

    features: int
    blocks: int
    stride: int = 1
    norm: str = "batch"
    dtype: Any = jnp.float32
    conv_backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        for index in range(self.blocks):
            stride = self.stride if index == 0 else 1
            x = BasicBlock(
                self.features, stride, self.norm, self.dtype, self.conv_backend, name=f"block{index + 1}"
            )(x, train)
        return self.perturb("output", x)


class ResNet(nn.Module):
    """ResNet with basic blocks for 32x32 images: the usual CIFAR variant (kuangliu/pytorch-cifar).

    prep:   conv3x3(64) norm ReLU  (no 7x7 stem, no max-pool)
    layer1: blocks x BasicBlock(64)
    layer2: blocks x BasicBlock(128), the first with stride 2 (and a 1x1 projection shortcut)
    layer3: blocks x BasicBlock(256), stride 2
    layer4: blocks x BasicBlock(512), stride 2
    head:   global average pool -> dense(num_classes) (`classifier`), logits unscaled

    `stage_sizes` gives the blocks per stage: (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3)
    ResNet-34. `width` scales every channel count; `norm` in NORMS; `dtype` is the
    compute dtype (parameters stay float32). images: float[N, H, W, 3] -> logits
    float32[N, num_classes]. At 32x32 the stage outputs are 32, 32, 16, 8, 4 pixels wide.
    """

    num_classes: int = 10
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    logit_scale: float = 1.0
    conv_backend: str = "xla"

    STAGES: ClassVar[tuple[str, ...]] = ("prep", "layer1", "layer2", "layer3", "layer4")

    @nn.compact
    def __call__(self, images, train: bool = False):
        channels = lambda c: scaled_channels(c, self.width)  # noqa: E731
        x = jnp.asarray(images, self.dtype)
        # prep is ResNet-9's stem too: conv3x3 norm ReLU, output perturbed for Grad-CAM
        x = ResidualStage(
            channels(64), residual=False, pool=False, norm=self.norm, dtype=self.dtype,
            conv_backend=self.conv_backend, name="prep",
        )(x, train)  # fmt: skip
        for index, (blocks, features) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
            x = ResNetStage(
                channels(features),
                blocks,
                stride=1 if index == 0 else 2,
                norm=self.norm,
                dtype=self.dtype,
                conv_backend=self.conv_backend,
                name=f"layer{index + 1}",
            )(x, train)
        return classifier_head(self, x, pooling="avg")


class ResNet18(ResNet):
    """ResNet-18 for 32x32 images: 11,173,962 parameters for 10 classes at width 1."""

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)


class ResNet34(ResNet):
    """ResNet-34 for 32x32 images: 21,282,122 parameters for 10 classes at width 1."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)


def dirac_kernel_init(base_init: Callable = torch_default_kernel_init) -> Callable:
    """`base_init`, then the first min(C_in, C_out) output filters set to the identity
    (torch.nn.init.dirac_ on weight[:C_in], as airbench's `Conv.reset_parameters`): a 1 at
    the kernel's centre from input channel i to output channel i, 0 elsewhere in them.
    shape: (kh, kw, C_in, C_out), flax's HWIO."""

    def init(key, shape, dtype=jnp.float32):
        kernel = base_init(key, shape, dtype)
        kh, kw, channels_in, channels_out = shape
        n = min(channels_in, channels_out)
        identity = jnp.zeros((kh, kw, channels_in, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(channels_in, n, dtype=dtype))
        return kernel.at[..., :n].set(identity)

    return init


def gelu(x: jax.Array) -> jax.Array:
    """GELU with the exact erf, as torch.nn.GELU() (flax's nn.gelu defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def max_pool_floor(x: jax.Array, size: int) -> jax.Array:
    """size x size max-pool with stride `size`, dropping the rows and columns that do not fill a
    window (PyTorch's nn.MaxPool2d(size) on sizes that are not multiples).
    T[N, H, W, C] -> T[N, H // size, W // size, C]."""
    n, height, width, channels = x.shape
    x = x[:, : height // size * size, : width // size * size]
    if size == 2:
        return max_pool_2x2(x)
    windows = x.reshape(n, height // size, size, width // size, size, channels)
    return windows.max(axis=(2, 4))


class Whitening(nn.Module):
    """airbench's first layer: a 2x2 convolution (stride 1, no padding) to 2 * 3 * 2 * 2 = 24
    channels with a bias, computed as one product of the 12-value patches with the kernel
    (so a CPU epoch has no XLA convolution in it). Its kernel is not learned: it is set from
    the data (`jaxres.airbench.whitening_kernel`); the bias is trained for a few epochs
    (`jaxres.optim.param_group`). float[N, H, W, 3] -> float[N, H - 1, W - 1, 24]."""

    features: int = 24
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", dirac_kernel_init(), (2, 2, channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        height, width = x.shape[1] - 1, x.shape[2] - 1
        patches = jnp.concatenate(
            [x[:, dy : dy + height, dx : dx + width] for dy in (0, 1) for dx in (0, 1)], axis=-1
        )  # [N, H-1, W-1, (dy, dx, c)], the order of the HWIO kernel's first three axes
        flat = jnp.asarray(kernel, self.dtype).reshape(-1, self.features)
        return jnp.dot(patches.astype(self.dtype), flat) + jnp.asarray(bias, self.dtype)


class AirbenchBlock(nn.Module):
    """airbench's ConvGroup: conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU.

    Convolutions have no bias and identity (dirac) first filters; BatchNorm has no learned
    scale, eps 1e-12 and running-average momentum 0.6 in flax's convention (PyTorch's 0.4:
    new = 0.6 * old + 0.4 * batch). float[N, H, W, C] -> float[N, H // 2, W // 2, features]."""

    features: int
    dtype: Any = jnp.float32
    conv_backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(
            nn.Conv, self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
            kernel_init=dirac_kernel_init(), conv_general_dilated=conv_function(self.conv_backend),
        )  # fmt: skip
        norm = functools.partial(
            BatchNorm, use_running_average=not train, momentum=0.6, epsilon=1e-12, use_scale=False, dtype=self.dtype
        )
        x = conv(name="conv1")(x)
        x = gelu(norm(name="norm1")(max_pool_floor(x, 2)))
        x = gelu(norm(name="norm2")(conv(name="conv2")(x)))
        return self.perturb("output", x)


class Airbench94(nn.Module):
    """airbench94's network (KellerJordan/cifar10-airbench, legacy/airbench94.py `make_net`):

    whiten: 2x2 whitening convolution (24 channels, frozen kernel, bias) -> GELU
    block1..3: `AirbenchBlock` of 64, 256, 256 channels (times `width`)
    head:   max-pool 3 -> flatten -> dense(num_classes, no bias) -> x 1/9

    At 32x32 the maps are 31 -> 15 -> 7 -> 3 -> 1 (pools floor odd sizes, as PyTorch's).
    1,971,640 parameters at width 1 with 10 classes (the whitening kernel's 288 are not
    trained; airbench's 1,152 BatchNorm weights, fixed at 1, are no parameters here). `norm` must be "batch" (airbench's BatchNorm). images: float[N, H, W, 3]
    -> logits: float32[N, num_classes].
    """

    num_classes: int = 10
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32
    logit_scale: float = 1 / 9
    conv_backend: str = "xla"

    STAGES: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.norm != "batch":
            raise JaxresError(f"the airbench94 model has airbench's own BatchNorm; norm {self.norm!r} is not offered")
        block = functools.partial(AirbenchBlock, dtype=self.dtype, conv_backend=self.conv_backend)
        x = gelu(Whitening(dtype=self.dtype, name="whiten")(jnp.asarray(images, self.dtype)))
        for name, channels in zip(self.STAGES, (64, 256, 256)):
            x = block(scaled_channels(channels, self.width), name=name)(x, train)
        x = max_pool_floor(x, 3).reshape(x.shape[0], -1)
        logits = nn.Dense(
            self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=torch_default_kernel_init, name="head"
        )(x)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) * self.logit_scale


# config.MODEL_NAMES: custom_resnet, resnet18, resnet34, airbench94
MODELS = dict(zip(MODEL_NAMES, (CustomResNet, ResNet18, ResNet34, Airbench94), strict=True))


def create_model(
    name: str = "custom_resnet",
    *,
    num_classes: int = 10,
    width: float = 1.0,
    norm: str = "batch",
    dtype: Any = jnp.float32,
    conv_backend: str = "auto",
) -> nn.Module:
    """A jaxres image classifier by name: the custom ResNet (ResNet-9) or ResNet-18/34.

    Builds the Flax module registered as `name` in `MODELS`, checking the options
    first so that a mistake is reported before any computation. The module holds no
    weights: make them with `init_variables(model, key)`, then call
    `model.apply(variables, images, train=...)` on normalised float[N, H, W, 3] images
    to get float32[N, num_classes] logits. Its stages (`model.STAGES`) are the layers
    Grad-CAM can explain.

    Args:
      name: "custom_resnet" (`CustomResNet`), "resnet18" or "resnet34" (`ResNet`).
      num_classes: the number of classes, the width of the logits.
      width: a factor on every channel count (1.0: the full-size model; each count
        is rounded and at least 1), e.g. 0.25 for a quick model.
      norm: the normalisation layer, one of `NORMS`: "batch", "group", "layer",
        "ghost_batch" (see `make_norm`).
      dtype: the compute dtype (e.g. jnp.bfloat16); parameters and BatchNorm
        statistics stay float32.
      conv_backend: "auto", "xla" or "onednn": who computes the 3x3 float32 /
        bfloat16 convolutions (`jaxres.onednn.resolve`; the module holds the resolved name).

    Returns:
      The unbound `flax.linen.Module`.

    Raises:
      JaxresError: for an unknown name, norm or conv_backend, a width that is not
        positive, or conv_backend "onednn" where it cannot run.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("norm", norm, NORMS)
    if not width > 0:
        raise JaxresError(f"width must be positive, got {width}")
    conv_backend = onednn.resolve(conv_backend)  # checks the name first, before any computation
    return MODELS[name](num_classes=num_classes, width=width, norm=norm, dtype=dtype, conv_backend=conv_backend)


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's stages, in order (the layers Grad-CAM can explain)."""
    return tuple(model.STAGES)


def count_params(params) -> int:
    """Number of scalars in a parameter tree (running statistics are not parameters)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


@functools.lru_cache(maxsize=64)
def stage_output_sizes(model: nn.Module, height: int, width: int) -> dict[str, tuple[int, int]] | None:
    """{stage: (h, w)} of each of `model.STAGES`'s outputs for height x width images, or None
    when the model cannot take them (a stage left with no pixels: its traced init fails, or
    an output has size 0). Traced only (`jax.eval_shape`), once per model and size."""
    image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    try:
        shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)
    except JaxresError:  # the model refuses its options (not the size): say that, not "too small"
        raise
    except (ValueError, TypeError, ZeroDivisionError):  # e.g. a max over no pixels
        return None
    outputs = shapes.get("perturbations", {})
    sizes = {stage: tuple(outputs[stage]["output"].shape[1:3]) for stage in getattr(model, "STAGES", ()) if stage in outputs}
    return None if any(0 in size for size in sizes.values()) else sizes


def smallest_image_size(model: nn.Module, largest: int = 256) -> int | None:
    """The smallest S such that `model` takes S x S images (8 for the custom ResNet: its three
    2x2 max-pools floor, 8 -> 4 -> 2 -> 1; 1 for ResNet-18/34, whose strided convolutions
    round up), None if none up to `largest`."""
    return next((size for size in range(1, largest + 1) if stage_output_sizes(model, size, size) is not None), None)


def check_image_size(model: nn.Module, image_shape) -> None:
    """Raise JaxresError when images of `image_shape` ((H, W) or (H, W, C)) are too small for
    `model`, naming the size and the smallest one accepted."""
    height, width = (int(n) for n in tuple(image_shape)[:2])
    if stage_output_sizes(model, height, width) is None:
        smallest = smallest_image_size(model)
        accepted = f"the smallest it accepts is {smallest}x{smallest}" if smallest else "it accepts none up to 256x256"
        raise JaxresError(
            f"images of {height}x{width} pixels are too small for {type(model).__name__}: a stage would have no "
            f"pixels left; {accepted}"
        )


def init_variables(model: nn.Module, key: jax.Array, image_shape=(32, 32, 3)) -> dict:
    """Fresh `{"params", ["batch_stats"]}` for `model` on images of `image_shape` (H, W, C).

    Only the collections a trained model keeps are returned (the `perturbations`
    that `init` also creates are dropped: they depend on the batch size). Raises
    JaxresError when the images are too small for the model (`check_image_size`).
    """
    check_image_size(model, image_shape)
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {name: value for name, value in variables.items() if name in ("params", "batch_stats")}


def from_config(config, num_classes: int) -> nn.Module:
    """The model a run's `jaxres.config.TrainConfig` describes (model, width, norm, the
    compute dtype of its precision, its conv_backend resolved), with `num_classes` outputs."""
    return create_model(
        config.model,
        num_classes=num_classes,
        width=config.width,
        norm=config.norm,
        dtype=precision.compute_dtype(config.precision),
        conv_backend=config.conv_backend,
    )
