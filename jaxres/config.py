"""Every training knob in one place: `TrainConfig`, the single description of a run.

The defaults are the original recipe (David Page's fast CIFAR-10 ResNet-9, as the PyTorch
course library ran it): 24 epochs, batch 512, SGD with Nesterov momentum 0.9, weight decay
5e-4 (added to the gradient, as `torch.optim.SGD` does), label smoothing 0.2, and a one-cycle
LR that rises linearly from 0 to `peak_lr` at epoch 5 and falls linearly to 0 at the end.

Each field carries its help text in its metadata; `python -m jaxres.train --help` and the
README's options table are generated from it (`jaxres.cli.options_table`). The command line
has one flag per field, spelled with dashes (`peak_lr` -> `--peak-lr`).

Fields are of two kinds. **Recipe** fields decide what is trained and reported (model,
data augmentation, optimiser, precision, seed, ...): a resumed run must keep them.
**Run options** only say where things are and how they are computed, not what
(`RUN_OPTIONS`: the data path, cache folder, workdir, epoch loop, evaluation batch size,
plot size): `--resume` accepts new values for them.

Named presets (`PRESETS`, `--preset NAME`) are plain functions returning a config, in the
style of big_vision's configs; flags given beside `--preset` override its values.

This module imports nothing heavier than the standard library (no JAX), so the PyTorch
side of the benchmarks can share it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from pathlib import Path
from typing import Any, Callable

from jaxres.errors import JaxresError

# The names every choice-valued knob accepts, defined once (models, augment and precision
# check their own arguments against these too).
PRECISIONS = ("fp32", "bf16", "fp16")
EPOCH_LOOPS = ("auto", "scan", "steps")
CONV_BACKENDS = ("auto", "xla", "onednn")
CONV_ALGORITHMS = ("direct", "winograd", "auto")
TTA_MODES = ("none", "flip", "flip_translate", "flip_translate_reflect")
CROP_PADDING_MODES = ("zeros", "reflect")
MIX_METHODS = ("none", "ricap", "mixup", "cutmix")
MODEL_NAMES = ("custom_resnet", "resnet18", "resnet34", "airbench94")
NORMS = ("batch", "group", "layer", "ghost_batch")


def check_choice(what: str, value, choices) -> None:
    """Raise JaxresError `unknown {what} {value!r}; choose one of ...` unless value is in choices."""
    if value not in choices:
        raise JaxresError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def knob(default, help: str, *, shown: str | None = None, run_option: bool = False):
    """A TrainConfig field: its default, its help text (for --help and the README table),
    how the default reads there (`shown`, default `repr`-like), and whether it is a run
    option (changeable on --resume) rather than part of the recipe."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown, "run_option": run_option})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Plain data: JSON-serialisable, hashable, immutable."""

    # Data
    data: str = knob(
        "cifar10",
        "dataset source: `cifar10` (TFDS, else the official archive, downloaded once), `shapes` "
        "(synthetic, offline), or a path: `cifar-10-python.tar.gz`, `cifar-10-batches-py/`, an image "
        "folder `ROOT/{train,test}/<class>/*`, or a `.tar(.gz)` of one (see Data sources)",
        run_option=True,
    )
    cache_dir: str | None = knob(
        None, "where decoded arrays are cached", shown="`$JAXRES_CACHE` or `~/.cache/jaxres`", run_option=True
    )
    train_subset: int | None = knob(
        None, "train on this many training images only (a seeded random subset)", shown="all"
    )
    # Model
    model: str = knob(
        "custom_resnet",
        "`custom_resnet` (ResNet-9, 6,573,130 parameters), `resnet18` (11,173,962) or `resnet34` "
        "(21,282,122): the CIFAR variants (3x3 stem, no initial max-pool, global average pool); "
        "`airbench94` (1,971,640 at width 1): airbench94's network, a frozen 2x2 whitening "
        "convolution, GELU, three conv-pool-BN blocks (see jaxres/airbench.py)",
    )
    width: float = knob(1.0, "channel width multiplier (0.25 trains quickly on a CPU)")
    norm: str = knob(
        "batch",
        "`batch`, `group` (gcd(32, C) groups), `layer` (over H, W, C) or `ghost_batch` (BatchNorm "
        "statistics over virtual batches of 32 images; same variables as `batch`)",
    )
    # Optimisation
    epochs: float = knob(24, "number of epochs; a fraction trains the last epoch in part (9.9: nine epochs, then 0.9 of a tenth)")
    batch_size: int = knob(512, "training batch size (a multiple of the device count)")
    peak_lr: float = knob(
        0.4,
        "peak learning rate of the one-cycle schedule; `auto` first runs the LR range "
        "test (`jaxres.lr_find`) on the run's initial model and uses its suggestion (recorded in "
        "`config.json`, plot in `lr_find.png`)",
    )
    peak_epoch: float | None = knob(
        None, "epoch (fractional) at which the LR peaks", shown="5/24 of the run (epoch 5 of 24)"
    )
    peak_fraction: float | None = knob(
        None, "instead of `--peak-epoch`: the LR peaks at step int(fraction * total steps), as airbench "
        "counts its warmup (airbench94: 0.23)", shown="unset",
    )  # fmt: skip
    lr_start_factor: float = knob(0.0, "the learning rate at step 0, as a fraction of the peak (the schedule rises linearly from it)")
    lr_end_factor: float = knob(0.0, "the learning rate at the last step, as a fraction of the peak (it falls linearly to it)")
    momentum: float = knob(0.9, "SGD momentum")
    nesterov: bool = knob(True, "Nesterov momentum")
    weight_decay: float = knob(5e-4, "L2 weight decay added to the gradient, as `torch.optim.SGD`")
    decoupled_hyperparameters: bool = knob(
        False,
        "read `peak_lr` and `weight_decay` per 1,024 examples, decoupled from the momentum and from "
        "each other, and convert them to SGD's as airbench does (`jaxres.optim.decoupled_sgd`)",
    )
    norm_bias_lr_scale: float = knob(
        1.0, "learning-rate multiplier for BatchNorm biases (their weight decay is divided by it, so "
        "the decay per step stays the same; airbench: 64)"
    )
    whiten_bias_epochs: int = knob(
        3, "airbench94 only: epochs during which the whitening layer's bias is trained (then frozen)"
    )
    lookahead_every: int = knob(
        0, "every this many steps, the weights and BatchNorm statistics move to an exponential moving "
        "average of themselves (airbench's lookahead; 0 disables; see `jaxres.optim.lookahead_update`)"
    )
    lookahead_decay: float = knob(
        0.95, "per-step decay of the lookahead average: decay**every * (step / total_steps)**3 per update"
    )
    label_smoothing: float = knob(
        0.2, "label smoothing of the cross-entropy (`optax.smooth_labels` + `softmax_cross_entropy`)"
    )
    # Augmentation
    crop_padding: int = knob(4, "pad-and-random-crop padding in pixels (0 disables)")
    crop_padding_mode: str = knob("zeros", "how the crop pads: `zeros` or `reflect` (airbench's translation)")
    flip: bool = knob(True, "random horizontal flips")
    alternating_flip: bool = knob(
        False,
        "with `flip`: each image is mirrored on exactly every other epoch (a random half of the images in "
        "even epochs, the other half in odd ones: airbench's scheme) instead of at random",
    )
    cutout_size: int = knob(8, "side of the cutout square in pixels (0 disables)")
    mix: str = knob(
        "none",
        "label-mixing augmentation after crop/flip/cutout, on the device: `ricap` (Takahashi et al. "
        "2018: four images' crops patched into one, labels mixed by area), `mixup` (convex blend of two "
        "images and labels) or `cutmix` (a box from another image, labels by area); the loss is the "
        "label-smoothed cross-entropy against the mixed labels",
    )
    mix_alpha: float | None = knob(
        None, "RICAP's beta, or mixup's / CutMix's alpha", shown="the method's: 0.3 for ricap, 1.0 otherwise"
    )
    # Evaluation
    tta: str = knob(
        "none",
        "test-time augmentation at every evaluation: `flip` (mean of the logits of the image and its "
        "mirror), `flip_translate` (also shifted by one pixel diagonally both ways, zero-filled: 6 "
        "views, equal weights) or `flip_translate_reflect` (airbench's TTA level 2: the same 6 views "
        "reflect-padded, the plain pair weighted 1/2 and each shifted pair 1/4)",
    )
    final_tta: str = knob(
        "none",
        "one more evaluation of the final model with this TTA (as `tta`), recorded as "
        "`final_tta_accuracy` in the last row of metrics.jsonl (airbench evaluates its epochs without TTA "
        "and the final model with `flip_translate_reflect`)",
    )
    # Precision
    precision: str = knob("fp32", "compute precision: `fp32`, `bf16`, or `fp16` with dynamic loss scaling")
    initial_loss_scale: float = knob(2.0**15, "fp16 only: the initial dynamic loss scale", shown="2^15")
    loss_scale_growth_interval: int = knob(2000, "fp16 only: finite steps before the loss scale doubles")
    # Run
    epoch_loop: str = knob(
        "auto",
        "how an epoch runs: `scan` (one compiled program per epoch), `steps` (a host loop of the "
        "jitted step) or `auto` (scan, but steps on a CPU when a step has an XLA convolution; see How "
        "an epoch runs)",
        run_option=True,
    )
    conv_backend: str = knob(
        "auto",
        "who computes the 3x3 float32 (and, on CPUs with bf16 instructions, bf16) convolutions: `xla`, `onednn` (oneDNN through JAX's FFI, CPU, one "
        "device) or `auto` (onednn on a one-device CPU when it builds, else xla; see jaxres/onednn.py)",
        run_option=True,
    )
    conv_algorithm: str = knob(
        "direct",
        "how the 3x3 float32 convolutions (stride 1, padding 1) are computed: `direct` (by the "
        "conv_backend), `winograd` (Winograd's F(4x4, 3x3) in XLA: 4x fewer multiplications, "
        "faster on CPUs; the others still by the conv_backend; see jaxres/winograd.py) or `auto` "
        "(winograd on a CPU, direct elsewhere)",
        run_option=True,
    )
    seed: int = knob(0, "random seed (same seed, same result on CPU)")
    eval_batch_size: int = knob(1000, "evaluation batch size", run_option=True)
    workdir: str = knob(
        "runs/default", "output folder: config.json, metrics.jsonl, checkpoint, plots", run_option=True
    )
    misclassified_to_plot: int = knob(25, "misclassified test images shown in misclassified.png", run_option=True)

    def __post_init__(self):
        validate(self)

    @property
    def epoch_count(self) -> int:
        """The number of epochs that run (a fractional last epoch counts as one)."""
        return math.ceil(self.epochs)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps in the whole run: ceil(epochs * steps_per_epoch), as airbench counts them."""
        return math.ceil(self.epochs * steps_per_epoch)

    def steps_in_epoch(self, epoch: int, steps_per_epoch: int) -> int:
        """Steps of epoch `epoch` (counted from 0): a full epoch, or what is left of the run."""
        return min(steps_per_epoch, self.total_steps(steps_per_epoch) - epoch * steps_per_epoch)

    @property
    def resolved_peak_epoch(self) -> float:
        """Epoch (fractional) where the one-cycle LR peaks (`peak_step` / steps per epoch when
        `peak_fraction` is set)."""
        if self.peak_fraction is not None:
            return self.peak_fraction * self.epochs
        return self.epochs * 5 / 24 if self.peak_epoch is None else self.peak_epoch

    def peak_step(self, steps_per_epoch: int) -> int:
        """The optimizer step at which the LR peaks: int(peak_fraction * total_steps) (airbench's
        int(total_train_steps * 0.23)) when `peak_fraction` is set, else the nearest step to
        `resolved_peak_epoch`."""
        if self.peak_fraction is not None:
            return int(self.peak_fraction * self.total_steps(steps_per_epoch))
        return int(round(self.resolved_peak_epoch * steps_per_epoch))

    def to_json(self) -> str:
        """Every field as a JSON object (indented, keys sorted): the contents of config.json."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def recipe_differences(self, other: "TrainConfig") -> list[str]:
        """The names of the recipe fields (not `RUN_OPTIONS`) in which `other` differs."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in RUN_OPTIONS and getattr(self, f.name) != getattr(other, f.name)
        ]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from field values (absent fields take their defaults); JaxresError names
        any key that is not a field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise JaxresError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """The config saved in the JSON file `path` (as `to_json` writes it); JaxresError when
        the file is missing, is not a JSON object or holds an unknown field."""
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


RUN_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["run_option"])


# --------------------------------------------------------------------------- presets


def quick(**overrides) -> TrainConfig:
    """A small model on 10,000 CIFAR-10 images for 4 epochs: ~60 % test accuracy in minutes
    on a CPU (the README's quick start, where the times are measured).

        python -m jaxres.train --preset quick --data ../shared/data/cifar10-jpeg.tar.gz
    """
    values = dict(width=0.25, epochs=4, batch_size=256, train_subset=10_000, workdir="runs/quick")
    return TrainConfig(**{**values, **overrides})


def recipe(**overrides) -> TrainConfig:
    """The original recipe: ResNet-9 at width 1, 24 epochs of batch 512 on all of CIFAR-10
    (the defaults; the intended use on a GPU).

        python -m jaxres.train --preset recipe --data cifar10
    """
    return TrainConfig(**overrides)


def shapes_demo(**overrides) -> TrainConfig:
    """The synthetic shapes dataset (offline, with object masks for Grad-CAM's localisation
    metrics): a small model for 3 epochs, a minute or two on a CPU.

        python -m jaxres.train --preset shapes_demo
    """
    values = dict(data="shapes", width=0.25, epochs=3, batch_size=256, workdir="runs/shapes")
    return TrainConfig(**{**values, **overrides})


def airbench94(**overrides) -> TrainConfig:
    """airbench94 (Keller Jordan's cifar10-airbench, `legacy/airbench94.py`: 94.01 % mean over
    1,000 runs on the official CIFAR-10) written anew in jaxres: its network (`model
    airbench94`), 9.9 epochs of batch 1,024, Nesterov SGD with momentum 0.85 and the
    decoupled LR 11.5 and weight decay 0.0153 per 1,024 examples, BatchNorm biases at 64x the
    LR, the schedule 0.2 -> 1 over the first 23 % of steps then -> 0.07, lookahead every 5
    steps, label smoothing 0.2, reflect-padded 2-pixel translation, alternating flip, no
    cutout; the epochs evaluate without TTA and the final model with its TTA level 2
    (`final_tta` `flip_translate_reflect`). Its 3x3 convolutions are Winograd's on a CPU
    (`conv_algorithm` `auto`: about 0.7x the direct step there) and cuDNN's on a GPU.

        python -m jaxres.train --preset airbench94 --data ../shared/data/cifar10-jpeg.tar.gz
    """
    values = dict(
        model="airbench94", epochs=9.9, batch_size=1024, peak_lr=11.5, weight_decay=0.0153,
        decoupled_hyperparameters=True, momentum=0.85, nesterov=True, norm_bias_lr_scale=64.0,
        peak_fraction=0.23, lr_start_factor=0.2, lr_end_factor=0.07, lookahead_every=5,
        lookahead_decay=0.95, whiten_bias_epochs=3, label_smoothing=0.2, crop_padding=2,
        crop_padding_mode="reflect", flip=True, alternating_flip=True, cutout_size=0,
        tta="none", final_tta="flip_translate_reflect", eval_batch_size=2000, workdir="runs/airbench94",
        conv_algorithm="auto",
    )  # fmt: skip
    if overrides.get("peak_epoch") is not None:  # a peak given in epochs replaces the fraction
        values["peak_fraction"] = None
    return TrainConfig(**{**values, **overrides})


PRESETS: dict[str, Callable[..., TrainConfig]] = {
    "quick": quick, "recipe": recipe, "shapes_demo": shapes_demo, "airbench94": airbench94,
}  # fmt: skip


def preset(name: str, **overrides) -> TrainConfig:
    """The config of the preset `name` (see `PRESETS`), with `overrides` applied."""
    check_choice("preset", name, tuple(PRESETS))
    return PRESETS[name](**overrides)


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
    if not (config.epochs > 0 and math.isfinite(config.epochs)):
        raise JaxresError(f"epochs must be a finite positive number, got {config.epochs}")
    positive_ints = ("batch_size", "eval_batch_size", "loss_scale_growth_interval")
    for name in positive_ints:
        if not getattr(config, name) >= 1:
            raise JaxresError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.train_subset is not None and not config.train_subset >= 1:
        raise JaxresError(f"train_subset must be at least 1, got {config.train_subset}")
    for name in ("crop_padding", "cutout_size", "misclassified_to_plot", "whiten_bias_epochs", "lookahead_every"):
        if not getattr(config, name) >= 0:
            raise JaxresError(f"{name} must be at least 0, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**63:
        raise JaxresError(f"seed must lie in [0, 2**63), got {config.seed}")
    positive_floats = ("width", "peak_lr", "initial_loss_scale", "norm_bias_lr_scale") + (("mix_alpha",) if config.mix_alpha is not None else ())
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
    for what, value, choices in (
        ("precision", config.precision, PRECISIONS),
        ("epoch_loop", config.epoch_loop, EPOCH_LOOPS),
        ("conv_backend", config.conv_backend, CONV_BACKENDS),
        ("conv_algorithm", config.conv_algorithm, CONV_ALGORITHMS),
        ("model", config.model, MODEL_NAMES),
        ("norm", config.norm, NORMS),
        ("mix", config.mix, MIX_METHODS),
        ("tta", config.tta, TTA_MODES),
        ("final_tta", config.final_tta, TTA_MODES),
        ("crop_padding_mode", config.crop_padding_mode, CROP_PADDING_MODES),
    ):
        check_choice(what, value, choices)
    if config.peak_fraction is not None:
        if config.peak_epoch is not None:
            raise JaxresError(
                f"peak_epoch ({config.peak_epoch}) and peak_fraction ({config.peak_fraction}) both place the LR peak: give one"
            )
        if not 0 <= config.peak_fraction <= 1:
            raise JaxresError(f"peak_fraction must lie in [0, 1], got {config.peak_fraction}")
    if config.peak_epoch is not None and not 0 <= config.peak_epoch <= config.epochs:
        raise JaxresError(
            f"peak_epoch must lie in [0, epochs={config.epochs}], got {config.peak_epoch}"
        )
    if not 0 <= config.label_smoothing < 1:
        raise JaxresError(f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")
    if not 0 <= config.momentum < 1:
        raise JaxresError(f"momentum must lie in [0, 1), got {config.momentum}")
    for name in ("lr_start_factor", "lr_end_factor"):
        if not 0 <= getattr(config, name) <= 1:
            raise JaxresError(f"{name} must lie in [0, 1], got {getattr(config, name)}")
    if not 0 < config.lookahead_decay <= 1:
        raise JaxresError(f"lookahead_decay must lie in (0, 1], got {config.lookahead_decay}")
