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

As in the Flax examples, blocks take their convolution and normalisation as module factories
(`conv`, `norm`: a module class or a `functools.partial` of one) that the top-level model
builds: its `conv` field (flax's `nn.Conv` by default, XLA's convolutions; another backend's
from `jaxres.backends`) with the model's dtype and initialiser bound, and its norm with
`train` bound. Building a model computes nothing and reads nothing from the environment.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxres.config import MODEL_NAMES, NORMS, check_choice
from jaxres.errors import JaxresError
from jaxres.layers import (  # noqa: F401  (the layers, also reached as jaxres.models.X)
    GHOST_BATCH_SIZE, BatchNorm, GhostBatchNorm, ModuleDef, batch_norm_rows, max_pool_2x2, max_pool_floor, norm_factory,
    row_means,
)


# PyTorch's default initialisation (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance scaling 1/3 on fan_in, uniform.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default bias init for Linear."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scaled_channels(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1."""
    return max(1, int(round(channels * width)))


class ConvNormReLU(nn.Module):
    """conv3x3 (no bias) -> [maxpool 2x2] -> norm -> ReLU.  float[N,H,W,C] -> float[N,H',W',features].

    `conv` and `norm` are the model's factories (its dtype, initialiser and `train` bound).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    pool: bool = False
    activation: Callable = nn.relu  # the model's ReLU (`jaxres.guided` swaps in guided backprop's)

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, (3, 3), padding=1, name="conv")(x)
        if self.pool:
            x = max_pool_2x2(x)
        return self.activation(self.norm(name="norm")(x))


class ResidualStage(nn.Module):
    """ConvNormReLU(pool) followed, optionally, by a residual block of two ConvNormReLU added to it."""

    features: int
    residual: bool
    conv: ModuleDef
    norm: ModuleDef
    pool: bool = True
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        block = functools.partial(ConvNormReLU, self.features, conv=self.conv, norm=self.norm, activation=self.activation)
        x = block(pool=self.pool, name="conv_block")(x)
        if self.residual:
            y = block(name="res1")(x)
            y = block(name="res2")(y)
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

    `width` scales every channel count; `norm` in NORMS; `dtype` is the compute dtype
    (parameters stay float32); `conv` the convolution factory (`jaxres.backends`). At width
    1.0 and 10 classes: 6,573,130 parameters. images: float[N, H, W, 3] -> logits:
    float32[N, num_classes].
    """

    num_classes: int = 10
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32
    logit_scale: float = 0.125
    conv: ModuleDef = nn.Conv
    activation: Callable = nn.relu  # every ReLU of the model (guided backprop swaps it: `jaxres.guided`)

    STAGES: ClassVar[tuple[str, ...]] = ("prep", "layer1", "layer2", "layer3")

    @nn.compact
    def __call__(self, images, train: bool = False):
        channels = lambda c: scaled_channels(c, self.width)  # noqa: E731
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype, kernel_init=torch_default_kernel_init)
        stage = functools.partial(
            ResidualStage, conv=conv, norm=norm_factory(self.norm, self.dtype, train), activation=self.activation
        )
        x = jnp.asarray(images, self.dtype)
        x = stage(channels(64), residual=False, pool=False, name="prep")(x)
        x = stage(channels(128), residual=True, name="layer1")(x)
        x = stage(channels(256), residual=False, name="layer2")(x)
        x = stage(channels(512), residual=True, name="layer3")(x)
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
    stride or the channel count changes. Convolutions have no bias (`conv` and `norm` are
    the model's factories). float[N, H, W, C] -> float[N, H / stride, W / stride, features].
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(self.conv, self.features)
        strides = (self.stride, self.stride)
        y = conv((3, 3), strides=strides, padding=1, name="conv1")(x)
        y = self.activation(self.norm(name="norm1")(y))
        y = conv((3, 3), padding=1, name="conv2")(y)
        y = self.norm(name="norm2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv((1, 1), strides=strides, padding=0, name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_norm")(shortcut)
        return self.activation(y + shortcut)


class ResNetStage(nn.Module):
    """`blocks` of `block` (the model's BasicBlock factory, its conv, norm and activation bound),
    named `block1`, `block2`, ...; the first has `stride`.

    The stage's output is marked `perturb("output", ...)` as in `ResidualStage`, for Grad-CAM.
    """

    features: int
    blocks: int
    block: ModuleDef
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        for index in range(self.blocks):
            x = self.block(self.features, stride=self.stride if index == 0 else 1, name=f"block{index + 1}")(x)
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
    compute dtype (parameters stay float32); `conv` the convolution factory
    (`jaxres.backends`). images: float[N, H, W, 3] -> logits float32[N, num_classes]. At
    32x32 the stage outputs are 32, 32, 16, 8, 4 pixels wide.
    """

    num_classes: int = 10
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    logit_scale: float = 1.0
    conv: ModuleDef = nn.Conv
    activation: Callable = nn.relu  # every ReLU of the model (guided backprop swaps it: `jaxres.guided`)

    STAGES: ClassVar[tuple[str, ...]] = ("prep", "layer1", "layer2", "layer3", "layer4")

    @nn.compact
    def __call__(self, images, train: bool = False):
        channels = lambda c: scaled_channels(c, self.width)  # noqa: E731
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype, kernel_init=torch_default_kernel_init)
        norm = norm_factory(self.norm, self.dtype, train)
        block = functools.partial(BasicBlock, conv=conv, norm=norm, activation=self.activation)
        x = jnp.asarray(images, self.dtype)
        # prep is ResNet-9's stem too: conv3x3 norm ReLU, output perturbed for Grad-CAM
        x = ResidualStage(
            channels(64), residual=False, conv=conv, norm=norm, pool=False, activation=self.activation, name="prep"
        )(x)
        for index, (blocks, features) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
            x = ResNetStage(channels(features), blocks, block, stride=1 if index == 0 else 2, name=f"layer{index + 1}")(x)
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
    new = 0.6 * old + 0.4 * batch); `Airbench94` binds them into `conv` and `norm`.
    float[N, H, W, C] -> float[N, H // 2, W // 2, features]."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(self.conv, self.features, (3, 3), padding=1)
        x = conv(name="conv1")(x)
        x = gelu(self.norm(name="norm1")(max_pool_floor(x, 2)))
        x = gelu(self.norm(name="norm2")(conv(name="conv2")(x)))
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
    conv: ModuleDef = nn.Conv  # the convolution factory (`jaxres.backends`)

    STAGES: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.norm != "batch":
            raise JaxresError(f"the airbench94 model has airbench's own BatchNorm; norm {self.norm!r} is not offered")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype, kernel_init=dirac_kernel_init())
        norm = functools.partial(
            BatchNorm, use_running_average=not train, momentum=0.6, epsilon=1e-12, use_scale=False, dtype=self.dtype
        )
        x = gelu(Whitening(dtype=self.dtype, name="whiten")(jnp.asarray(images, self.dtype)))
        for name, channels in zip(self.STAGES, (64, 256, 256)):
            x = AirbenchBlock(scaled_channels(channels, self.width), conv, norm, name=name)(x)
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
    conv: ModuleDef = nn.Conv,
) -> nn.Module:
    """A jaxres image classifier by name: the custom ResNet (ResNet-9), ResNet-18/34 or airbench94.

    Builds the Flax module registered as `name` in `MODELS`, checking the options
    first so that a mistake is reported before any computation; building it has no other
    effect. The module holds no weights: make them with `init_variables(model, key)`, then
    call `model.apply(variables, images, train=...)` on normalised float[N, H, W, 3] images
    to get float32[N, num_classes] logits. Its stages (`model.STAGES`) are the layers
    Grad-CAM can explain.

    Args:
      name: "custom_resnet" (`CustomResNet`), "resnet18" or "resnet34" (`ResNet`),
        "airbench94" (`Airbench94`).
      num_classes: the number of classes, the width of the logits.
      width: a factor on every channel count (1.0: the full-size model; each count
        is rounded and at least 1), e.g. 0.25 for a quick model.
      norm: the normalisation layer, one of `NORMS`: "batch", "group", "layer",
        "ghost_batch" (see `norm_factory`).
      dtype: the compute dtype (e.g. jnp.bfloat16); parameters and BatchNorm
        statistics stay float32.
      conv: the convolution factory, flax's `nn.Conv` (XLA's convolutions) or a
        resolved backend's (`jaxres.backends.resolve(...).conv`).

    Returns:
      The unbound `flax.linen.Module`.

    Raises:
      JaxresError: for an unknown name or norm, or a width that is not positive.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("norm", norm, NORMS)
    if not width > 0:
        raise JaxresError(f"width must be positive, got {width}")
    return MODELS[name](num_classes=num_classes, width=width, norm=norm, dtype=dtype, conv=conv)


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

