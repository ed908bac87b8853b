"""PyTorch reference of the course library: the custom ResNet and hook-based Grad-CAM.

This file holds only the model (`CustomResNet`, its norms and blocks) and `torch_gradcam`,
self-contained: torch and NumPy, no jaxres, no torchvision. The module names mirror the Flax
tree of `jaxres.models.CustomResNet`, so `jaxres.convert` maps weights mechanically (see its
docstring). The training recipe in PyTorch (optimizer, one-cycle schedule, augmentation,
input pipelines, evaluation and TTA) is in `benchmarks/torch_train.py`, which builds this
model; `benchmarks/worker_torch.py` runs both for the benchmarks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "layer")


def scaled_channels(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1 (as jaxres.models)."""
    return max(1, int(round(channels * width)))


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d (eps 1e-5, momentum 0.1), GroupNorm(gcd(32, C), C) or GroupNorm(1, C)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-5)
    if norm == "layer":
        return nn.GroupNorm(1, channels, eps=1e-5)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class ConvNormReLU(nn.Module):
    """conv3x3 (no bias) -> [maxpool 2x2] -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False, norm: str = "batch"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = make_norm(norm, out_channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.norm(self.pool(self.conv(x))))


class ResidualStage(nn.Module):
    """ConvNormReLU(pool), then optionally x + res2(res1(x))."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool, pool: bool = True, norm: str = "batch"):
        super().__init__()
        self.conv_block = ConvNormReLU(in_channels, out_channels, pool=pool, norm=norm)
        self.residual = residual
        if residual:
            self.res1 = ConvNormReLU(out_channels, out_channels, norm=norm)
            self.res2 = ConvNormReLU(out_channels, out_channels, norm=norm)

    def forward(self, x):
        x = self.conv_block(x)
        if self.residual:
            x = x + self.res2(self.res1(x))
        return x


class CustomResNet(nn.Module):
    """The custom ResNet (ResNet-9) of fast CIFAR-10 training, NCHW.

    prep:   conv3x3(64) BN ReLU
    layer1: conv3x3(128) maxpool2 BN ReLU + residual [conv BN ReLU conv BN ReLU]
    layer2: conv3x3(256) maxpool2 BN ReLU
    layer3: conv3x3(512) maxpool2 BN ReLU + residual
    head:   AdaptiveMaxPool2d(1) -> Linear(num_classes) -> x 0.125
    """

    STAGES = ("prep", "layer1", "layer2", "layer3")

    def __init__(self, num_classes: int = 10, width: float = 1.0, norm: str = "batch", logit_scale: float = 0.125):
        super().__init__()
        c = lambda n: scaled_channels(n, width)  # noqa: E731
        self.prep = ResidualStage(3, c(64), residual=False, pool=False, norm=norm)
        self.layer1 = ResidualStage(c(64), c(128), residual=True, norm=norm)
        self.layer2 = ResidualStage(c(128), c(256), residual=False, norm=norm)
        self.layer3 = ResidualStage(c(256), c(512), residual=True, norm=norm)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(c(512), num_classes)
        self.logit_scale = logit_scale

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x) * self.logit_scale


def torch_gradcam(model: nn.Module, images_nchw_normalized: torch.Tensor, targets=None, layer_name: str = "layer3") -> np.ndarray:
    """Grad-CAM with hooks, in the course library's style.

    A forward hook on `layer_name` keeps its output A and registers a tensor hook that
    keeps the gradient dS_c/dA; weights w_k = mean over (i, j) of the gradient; cam =
    ReLU(sum_k w_k A_k), upsampled bilinearly (align_corners=False) to the input size
    and min-max normalised per image (a flat map gives zeros). The model is put in
    eval mode. images: float32[N, 3, H, W] (normalised); targets: None (predicted
    class), int, or ints[N]. Returns float32[N, H, W].
    """
    model.eval()
    layer = dict(model.named_modules())[layer_name]
    saved = {}

    def save_gradient(gradient):
        saved["gradient"] = gradient.detach()

    def forward_hook(module, inputs, output):
        saved["activation"] = output.detach()
        output.register_hook(save_gradient)

    handle = layer.register_forward_hook(forward_hook)
    try:
        model.zero_grad()
        logits = model(images_nchw_normalized)
        if targets is None:
            targets = logits.argmax(dim=1)
        targets = torch.as_tensor(targets, dtype=torch.long).expand(logits.shape[0])
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        logits.backward(gradient=one_hot)
    finally:
        handle.remove()
    activation, gradient = saved["activation"], saved["gradient"]
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images_nchw_normalized.shape[2:], mode="bilinear", align_corners=False)
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    flat = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return flat.view(cam.shape[0], *cam.shape[2:]).numpy()


# ------------------------------------------------------------------ end of model and Grad-CAM part
