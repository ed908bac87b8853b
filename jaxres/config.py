"""Every training knob in one place. The defaults are the original recipe.

The recipe (David Page's fast CIFAR-10 ResNet-9, as the PyTorch course library ran it):
24 epochs, batch 512, SGD with Nesterov momentum 0.9, weight decay 5e-4 (added to
the gradient, as `torch.optim.SGD` does), label smoothing 0.2, and a one-cycle LR
that rises linearly from 0 to `peak_lr` at epoch 5 and falls linearly to 0 at the end.

The command line (`python -m jaxres.train --help`) has one flag per field, spelled
with dashes (`peak_lr` -> `--peak-lr`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from pathlib import Path
from typing import Any

from jaxres.errors import JaxresError
from jaxres.models import MODELS, NORMS

PRECISIONS = ("fp32", "bf16", "fp16")
EPOCH_LOOPS = ("auto", "scan", "steps")
TTA_MODES = ("none", "flip", "flip_translate")
MIX_METHODS = ("none", "ricap", "mixup", "cutmix")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Plain data: JSON-serialisable, hashable, immutable."""

    # Data
    data: str = "cifar10"  # "cifar10" (TFDS), "shapes", or a path: archive, image folder, .tar(.gz)
    cache_dir: str | None = None  # decoded-array cache; default $JAXRES_CACHE or ~/.cache/jaxres
    train_subset: int | None = None  # use only the first N training images (after a seeded shuffle)
    # Model
    model: str = "custom_resnet"
    width: float = 1.0  # scales every channel count
    norm: str = "batch"  # batch | group | layer | ghost_batch
    # Optimisation
    epochs: int = 24
    batch_size: int = 512
    peak_lr: float = 0.4
    peak_epoch: float | None = None  # None: 5/24 of the run (epoch 5 of 24)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    # Augmentation
    crop_padding: int = 4
    flip: bool = True
    cutout_size: int = 8  # 0 disables cutout
    mix: str = "none"  # none | ricap | mixup | cutmix: label-mixing augmentation
    mix_alpha: float | None = None  # RICAP's beta / mixup's and CutMix's alpha; None: the method's default
    # Evaluation
    tta: str = "none"  # none | flip | flip_translate: test-time augmentation (mean of logits)
    # Precision
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with dynamic loss scaling)
    initial_loss_scale: float = 2.0**15
    loss_scale_growth_interval: int = 2000
    # Run
    epoch_loop: str = "auto"  # auto | scan | steps: how an epoch runs (see train.resolve_epoch_loop)
    seed: int = 0
    eval_batch_size: int = 1000
    workdir: str = "runs/default"
    misclassified_to_plot: int = 25

    def __post_init__(self):
        validate(self)

    @property
    def resolved_peak_epoch(self) -> float:
        """Epoch (fractional) where the one-cycle LR peaks."""
        return self.epochs * 5 / 24 if self.peak_epoch is None else self.peak_epoch

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise JaxresError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise JaxresError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise JaxresError(f"config file {path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise JaxresError(f"config file {path} is not a JSON object of config fields")
        return cls.from_dict(values)


def _check_types(config: TrainConfig) -> None:
    """Raise JaxresError naming the first field whose value is not of its annotated type
    (bool is not a number here; an int is a fine float)."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kinds = typing.get_args(hints[field.name]) or (hints[field.name],)
        if value is None and type(None) in kinds:
            continue
        kind = next(kind for kind in kinds if kind is not type(None))
        if kind is bool:
            fits = isinstance(value, bool)
        elif kind in (int, float):
            fits = isinstance(value, numbers.Integral if kind is int else numbers.Real) and not isinstance(value, bool)
        else:
            fits = isinstance(value, kind)
        if not fits:
            raise JaxresError(f"{field.name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Raise JaxresError naming the first knob with an impossible value.

    Every comparison is written so that NaN fails it (`not x > 0`, never `x <= 0`).
    """
    _check_types(config)
    positive_ints = ("epochs", "batch_size", "eval_batch_size", "loss_scale_growth_interval")
    for name in positive_ints:
        if not getattr(config, name) >= 1:
            raise JaxresError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.train_subset is not None and not config.train_subset >= 1:
        raise JaxresError(f"train_subset must be at least 1, got {config.train_subset}")
    for name in ("crop_padding", "cutout_size", "misclassified_to_plot"):
        if not getattr(config, name) >= 0:
            raise JaxresError(f"{name} must be at least 0, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**63:
        raise JaxresError(f"seed must lie in [0, 2**63), got {config.seed}")
    positive_floats = ("width", "peak_lr", "initial_loss_scale") + (("mix_alpha",) if config.mix_alpha is not None else ())
    for name in positive_floats:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise JaxresError(f"{name} must be a finite positive number, got {value}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise JaxresError(f"weight_decay must be a finite number >= 0, got {config.weight_decay}")
    if not config.data:
        raise JaxresError("data must not be empty")
    if not config.workdir:
        raise JaxresError("workdir must not be empty")
    if config.precision not in PRECISIONS:
        raise JaxresError(
            f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if config.epoch_loop not in EPOCH_LOOPS:
        raise JaxresError(
            f"unknown epoch_loop {config.epoch_loop!r}; choose one of {', '.join(EPOCH_LOOPS)}"
        )
    if config.model not in MODELS:
        raise JaxresError(f"unknown model {config.model!r}; choose one of {', '.join(sorted(MODELS))}")
    if config.norm not in NORMS:
        raise JaxresError(f"unknown norm {config.norm!r}; choose one of {', '.join(NORMS)}")
    if config.mix not in MIX_METHODS:
        raise JaxresError(f"unknown mix {config.mix!r}; choose one of {', '.join(MIX_METHODS)}")
    if config.tta not in TTA_MODES:
        raise JaxresError(f"unknown tta {config.tta!r}; choose one of {', '.join(TTA_MODES)}")
    if config.peak_epoch is not None and not 0 <= config.peak_epoch <= config.epochs:
        raise JaxresError(
            f"peak_epoch must lie in [0, epochs={config.epochs}], got {config.peak_epoch}"
        )
    if not 0 <= config.label_smoothing < 1:
        raise JaxresError(f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")
    if not 0 <= config.momentum < 1:
        raise JaxresError(f"momentum must lie in [0, 1), got {config.momentum}")
