"""The jaxres training recipe in PyTorch, best practice on its side, for the benchmarks.

The model is `benchmarks.torch_reference.CustomResNet` (written from the model description,
module names matching `jaxres.convert`). The recipe mirrors `jaxres.config.TrainConfig`'s
defaults, written from its description (nothing here imports jax):

* SGD, Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (coupled, as
  `torch.optim.SGD(weight_decay=...)`), label smoothing 0.2
  (`CrossEntropyLoss(label_smoothing=0.2)`), batch 512, peak LR 0.4.
* One-cycle LR per step, piecewise linear: 0 -> peak at 5/24 of the run -> 0 at the end.
  Step s (0-based, the s-th update) uses `one_cycle_lr(s)`, as optax evaluates its
  schedule on the count of updates already made, so the first update has LR 0.
* Augmentation: zero-pad 4 and random 32x32 crop, horizontal flip (p = 1/2), one 8x8
  cutout square (zeros) placed wholly inside the image, all on uint8 pixels, then
  normalisation with the CIFAR-10 mean/std.
* Mixed precision on a GPU: `torch.autocast` (fp16 or bf16) and, for fp16, a
  `GradScaler`; `channels_last`; `cudnn.benchmark`; optional `torch.compile`.

Two input pipelines, both reading the same uint8[N, 32, 32, 3] arrays as jaxres:

* ``"loader"``, the original library's style: a `Dataset` whose `__getitem__` augments one
  image on the CPU with NumPy, batched by a `torch.utils.data.DataLoader`
  (shuffle, `num_workers`, pinned memory on a GPU), copied to the device per batch.
* ``"device"``: the whole split as a uint8 tensor on the device; each step gathers a
  shuffled batch and augments it there with batched tensor ops (as jaxres does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import CustomResNet
from jaxres.config import TrainConfig  # plain Python, no jax
from jaxres.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: F401  (NumPy only; per channel, on the [0, 1] scale)

PIPELINES = ("device", "loader")
RECIPE = TrainConfig()  # the original recipe's values, the defaults of both sides
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training knobs of the PyTorch side (defaults: the original 24-epoch recipe)."""

    width: float = RECIPE.width
    norm: str = RECIPE.norm
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    peak_lr: float = RECIPE.peak_lr
    peak_epoch: float | None = RECIPE.peak_epoch  # None: 5/24 of the run
    peak_fraction: float | None = RECIPE.peak_fraction  # None: the peak is peak_epoch's
    momentum: float = RECIPE.momentum
    nesterov: bool = RECIPE.nesterov
    weight_decay: float = RECIPE.weight_decay
    label_smoothing: float = RECIPE.label_smoothing
    crop_padding: int = RECIPE.crop_padding
    flip: bool = RECIPE.flip
    cutout_size: int = RECIPE.cutout_size
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    eval_batch_size: int = RECIPE.eval_batch_size

    resolved_peak_epoch = TrainConfig.resolved_peak_epoch  # the same rules: 5/24 of the run by default
    total_steps = TrainConfig.total_steps
    peak_step = TrainConfig.peak_step


# --------------------------------------------------------------------------- schedule, optimizer


def one_cycle_lr(step: int, peak_lr: float, total_steps: int, peak_step: int) -> float:
    """LR of the `step`-th update (0-based): linear 0 -> peak_lr over [0, peak_step], then
    linear peak_lr -> 0 at total_steps; 0 past the end. (The same piecewise-linear
    function as `jaxres.optim.one_cycle_lr`.)"""
    peak_step = int(min(max(peak_step, 0), total_steps))
    if step < peak_step:
        return peak_lr * step / peak_step
    fall = max(total_steps - peak_step, 1)
    return peak_lr * max(0.0, 1.0 - (step - peak_step) / fall)


def make_schedule(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    total_steps = recipe.total_steps(steps_per_epoch)
    peak_step = recipe.peak_step(steps_per_epoch)
    return lambda step: one_cycle_lr(step, recipe.peak_lr, total_steps, peak_step)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with Nesterov momentum and coupled weight decay on every parameter (as jaxres)."""
    return torch.optim.SGD(
        model.parameters(),
        lr=0.0,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )


# --------------------------------------------------------------------------- augmentation


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float[N, 3, H, W] in [0, 255] -> float32 (x / 255 - mean) / std, per channel."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    inverse_std = 1.0 / (torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1) * 255.0)
    return (images.float() - mean) * inverse_std


def augment_batch(
    images: torch.Tensor, generator: torch.Generator | None, padding: int = 4, flip: bool = True, cutout: int = 8
) -> torch.Tensor:
    """Pad-crop, flip, cutout on a batch, on its device.  uint8[N, H, W, C] -> uint8[N, H, W, C].

    Each image draws its own crop offset in [0, 2 * padding], flip bit and cutout corner
    (uniform over positions keeping the square inside), as `jaxres.augment.augment_batch`.
    """
    n, height, width, _ = images.shape
    device = images.device
    draw = lambda high, shape: torch.randint(0, high, shape, generator=generator, device=device)  # noqa: E731
    if padding:
        padded = F.pad(images, (0, 0, padding, padding, padding, padding))
        offsets = draw(2 * padding + 1, (n, 2))
        rows = offsets[:, 0:1] + torch.arange(height, device=device)  # [N, H]
        cols = offsets[:, 1:2] + torch.arange(width, device=device)  # [N, W]
        batch = torch.arange(n, device=device)[:, None, None]
        images = padded[batch, rows[:, :, None], cols[:, None, :]]
    if flip:
        mirror = draw(2, (n,)).bool()[:, None, None, None]
        images = torch.where(mirror, images.flip(2), images)
    if cutout:
        top = draw(height - cutout + 1, (n, 1, 1))
        left = draw(width - cutout + 1, (n, 1, 1))
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        inside = (rows >= top) & (rows < top + cutout) & (cols >= left) & (cols < left + cutout)
        images = images.masked_fill(inside[..., None], 0)
    return images


def augment_one(image: np.ndarray, rng: np.random.Generator, padding: int = 4, flip: bool = True, cutout: int = 8) -> np.ndarray:
    """The same augmentation on one image with NumPy (the original per-sample CPU style).

    image: uint8[H, W, C] -> uint8[H, W, C].
    """
    height, width, _ = image.shape
    if padding:
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        top, left = rng.integers(0, 2 * padding + 1, size=2)
        image = padded[top : top + height, left : left + width]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    if cutout:
        image = image.copy()
        top = rng.integers(0, height - cutout + 1)
        left = rng.integers(0, width - cutout + 1)
        image[top : top + cutout, left : left + cutout] = 0
    return image


_MEAN_255 = np.asarray(CIFAR10_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(CIFAR10_STD, np.float32) * 255.0)


class AugmentedCifar(torch.utils.data.Dataset):
    """Per-sample CPU augmentation and normalisation (the original library's Dataset).

    images: uint8[N, H, W, 3]; labels: int[N]. Item i: (float32[3, H, W] normalised, int64 label).
    Each DataLoader worker gets its own NumPy generator (seeded from torch's per-worker seed).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, recipe: Recipe, seed: int = 0):
        self.images = images
        self.labels = np.asarray(labels, np.int64)
        self.recipe = recipe
        self.seed = seed
        self.rng = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        if self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng(info.seed if info is not None else self.seed)
        r = self.recipe
        image = augment_one(self.images[index], self.rng, r.crop_padding, r.flip, r.cutout_size)
        image = ((image.astype(np.float32) - _MEAN_255) * _INV_STD_255).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[index])


# --------------------------------------------------------------------------- model, batches


def build_model(recipe: Recipe, device: torch.device, num_classes: int = 10, state_dict=None) -> nn.Module:
    """The CustomResNet on `device` (channels_last when asked), with `state_dict` loaded if given.

    state_dict: name -> array or tensor (e.g. `jaxres.convert.flax_to_torch` output or an npz).
    """
    model = CustomResNet(num_classes=num_classes, width=recipe.width, norm=recipe.norm)
    if state_dict is not None:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    model = model.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_model_input(images_nchw: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    if recipe.channels_last:
        return images_nchw.contiguous(memory_format=torch.channels_last)
    return images_nchw.contiguous()


def device_batches(
    images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs float32[B, 3, H, W] normalised, labels int64[B]) from tensors on the device.

    Each epoch is a fresh permutation (the last partial batch is dropped); each batch is
    gathered and augmented on the device.
    """
    n = images.shape[0]
    steps = n // recipe.batch_size
    while True:
        order = torch.randperm(n, generator=generator, device=images.device)
        for step in range(steps):
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            batch = augment_batch(images[index], generator, recipe.crop_padding, recipe.flip, recipe.cutout_size)
            inputs = normalize(batch.permute(0, 3, 1, 2))  # NHWC memory, i.e. channels_last already
            yield to_model_input(inputs, recipe), labels[index]


def make_loader(images: np.ndarray, labels: np.ndarray, recipe: Recipe, num_workers: int, device: torch.device, seed: int = 0):
    """The original-style DataLoader (per-sample CPU augmentation), shuffled, last batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        AugmentedCifar(images, labels, recipe, seed),
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=generator,
    )


def loader_batches(loader, recipe: Recipe, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches from `loader`, copied to `device` (non-blocking from pinned memory)."""
    while True:
        for inputs, labels in loader:
            inputs = inputs.to(device, non_blocking=True)
            yield to_model_input(inputs, recipe), labels.to(device, non_blocking=True)


# --------------------------------------------------------------------------- steps


class Trainer:
    """Model, optimizer, loss, schedule, AMP and (fp16) GradScaler: `step(inputs, labels)`.

    `step` returns the loss and the count of correct predictions as device tensors (no
    host synchronisation); `synchronize()` waits for the device.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, steps_per_epoch: int, device: torch.device, allow_cpu_amp: bool = False):
        self.model = model
        self.recipe = recipe
        self.device = device
        self.optimizer = make_optimizer(model, recipe)
        self.schedule = make_schedule(recipe, steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.autocast_dtype = AUTOCAST_DTYPES.get(recipe.precision)
        if self.autocast_dtype is not None and device.type != "cuda" and not allow_cpu_amp:
            raise ValueError(f"precision {recipe.precision} is measured on a GPU only; use fp32 on {device.type}")
        self.scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
        self.forward = torch.compile(model) if recipe.compile else model
        self.step_count = 0

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train()
        lr = self.schedule(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward(inputs)
            # the loss in float32 under autocast (float64 models, used by the parity tests, keep float64)
            loss = self.criterion(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step_count += 1
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_steps(trainer: Trainer, batches: Iterator, steps: int) -> dict:
    """`steps` training steps from `batches`; returns mean loss and accuracy (one host sync at the end)."""
    losses, correct, seen = [], [], 0
    for _ in range(steps):
        inputs, labels = next(batches)
        loss, right = trainer.step(inputs, labels)
        losses.append(loss)
        correct.append(right)
        seen += labels.shape[0]
    trainer.synchronize()
    return {"loss": float(torch.stack(losses).mean()), "accuracy": float(torch.stack(correct).sum()) / seen}


TTA_MODES = ("none", "flip")


def predict_logits(forward, images: torch.Tensor, recipe: Recipe, tta: str = "none") -> torch.Tensor:
    """Logits of uint8[B, H, W, 3] images, averaged over test-time augmentations: "none"; "flip"
    (the mean of the logits of the image and its mirror, as `jaxres.evaluate.predict_logits`).
    -> float32[B, K] (the forward under autocast when the recipe's precision asks)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    dtype = AUTOCAST_DTYPES.get(recipe.precision)
    views = [images] if tta == "none" else [images, images.flip(2)]  # axis 2 of NHWC: the width
    logits = []
    for view in views:
        inputs = to_model_input(normalize(view.permute(0, 3, 1, 2)), recipe)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(forward(inputs).float())
    return sum(logits) / len(logits)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, forward=None, tta: str = "none") -> dict:
    """Loss (the training criterion) and accuracy over uint8[N, H, W, 3] images, in eval mode,
    on the logits of `predict_logits(..., tta)`."""
    model.eval()
    forward = model if forward is None else forward
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction="sum")
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], recipe.eval_batch_size):
        logits = predict_logits(forward, images[start : start + recipe.eval_batch_size], recipe, tta)
        target = labels[start : start + recipe.eval_batch_size]
        loss_sum += criterion(logits, target)
        correct += (logits.argmax(1) == target).sum()
    n = images.shape[0]
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


# --------------------------------------------------------------------------- time to accuracy


def train_to_accuracy(
    model: nn.Module,
    recipe: Recipe,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    device: torch.device,
    seed: int = 0,
    target: float | None = None,
    log: Callable[[str], None] = lambda _: None,
    tta: str = "none",
) -> dict:
    """The whole recipe (device pipeline): `recipe.epochs` epochs, test accuracy after each.

    Returns {history: [{epoch, train_loss, train_accuracy, test_accuracy, seconds,
    elapsed}], final_accuracy, wall_seconds, seconds_to_target (None if not reached)}.
    `elapsed` counts from the first step, evaluation included (what a user waits). With a
    `tta` other than "none", the final model is evaluated once more with it, apart from the
    wall time: {tta, final_tta_accuracy, final_tta_loss, tta_seconds} too.
    """
    steps_per_epoch = train_images.shape[0] // recipe.batch_size
    trainer = Trainer(model, recipe, steps_per_epoch, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = device_batches(train_images, train_labels, recipe, generator)
    history, reached = [], None
    started = time.perf_counter()
    for epoch in range(recipe.epochs):
        epoch_start = time.perf_counter()
        metrics = train_steps(trainer, batches, steps_per_epoch)
        seconds = time.perf_counter() - epoch_start
        evaluation = evaluate(model, test_images, test_labels, recipe, forward=trainer.forward)
        elapsed = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": metrics["loss"],
            "train_accuracy": metrics["accuracy"],
            "test_accuracy": evaluation["accuracy"],
            "test_loss": evaluation["loss"],
            "seconds": seconds,
            "elapsed": elapsed,
        }
        history.append(row)
        log(f"torch epoch {epoch + 1}: train loss {metrics['loss']:.4f}, test accuracy {evaluation['accuracy']:.4f}, {seconds:.1f} s")
        if reached is None and target is not None and evaluation["accuracy"] >= target:
            reached = elapsed
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the PyTorch training loss became non-finite at epoch {epoch + 1}")
    out = {
        "history": history,
        "final_accuracy": history[-1]["test_accuracy"],
        "wall_seconds": time.perf_counter() - started,
        "seconds_to_target": reached,
    }
    if tta != "none":
        tta_started = time.perf_counter()
        evaluation = evaluate(model, test_images, test_labels, recipe, forward=trainer.forward, tta=tta)
        out.update(tta=tta, final_tta_accuracy=evaluation["accuracy"], final_tta_loss=evaluation["loss"],
                   tta_seconds=time.perf_counter() - tta_started)
    return out
