"""The LR range test (Smith 2017, "Cyclical learning rates"): a peak LR for the one-cycle schedule.

    result = lr_range_test(model, variables, images, labels, key=key)
    result.suggested_lr                 # the peak LR to train with
    figure = plot_lr_range(result)      # smoothed loss against LR (log x), suggestion marked

From a fresh model, train for up to `steps` steps with the training optimizer (SGD with
Nesterov momentum and coupled weight decay, label-smoothed cross-entropy, BatchNorm in
training mode) while the LR grows exponentially from `min_lr` to `max_lr`; record the loss
of every step, smooth it with a bias-corrected exponential moving average, and stop once
the smoothed loss exceeds `divergence_factor` times its best value (or is not finite).

The suggestion: the LR at the minimum of the smoothed loss, divided by
`suggestion_divisor` (10), clipped to the swept range. Why this rule: at the minimum the
steps are already large enough to start undoing progress, and the moving average lags
(with smoothing 0.98 it averages about 50 steps, a quarter of a 200-step sweep, i.e. more
than a decade of LR), so the minimum is recorded at a larger LR than where the loss
actually turned; one order of magnitude below it is the LR that still descends fast and
stays stable, which is what a one-cycle peak wants (the fastai `lr_min` rule and
Gugger's one-cycle advice). The steepest-slope rule is the usual alternative, but it
differentiates a noisy curve and, on short sweeps, jumps between distant LRs from seed
to seed; the minimum is robust. If the loss is still falling at `max_lr`
(`still_falling_at_the_end`), the minimum only reflects `max_lr`: sweep wider. The data
are not augmented (normalised images only).

The step is the trainer's own (`jaxres.train.train_step`, the LR injected into the
optimizer state with `optax.inject_hyperparams`), run as a host loop (`jaxres.loops.host_loop`):
the host watches each step's loss to stop on divergence (one device; the data stay on it).

Command line (`jaxres.cli.lr_find_main`): `python -m jaxres.lr_find --data cifar10 --model custom_resnet --out lr_find.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from jaxres import backends, data, loops, models, optim, train
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError


MAX_STEPS = 100_000  # a sweep records a few floats per step; more steps than this is a typo


class LRFindResult(NamedTuple):
    """The outcome of `lr_range_test`, on the host.

    lrs: float64[S], the LR of each step taken (S <= steps); losses: float64[S], each
    step's training loss (before its update); smoothed_losses: float64[S], their
    bias-corrected EMA (`smooth_losses`); suggested_lr: the peak LR to use
    (`suggest_lr`); min_loss_lr: the LR where the smoothed loss was lowest;
    stopped_early: the sweep stopped before `steps` (diverged or not finite).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    suggested_lr: float
    min_loss_lr: float
    stopped_early: bool

    def to_dict(self) -> dict:
        """JSON-ready: lists of floats and scalars."""
        return {
            "lrs": [float(x) for x in self.lrs],
            "losses": [float(x) for x in self.losses],
            "smoothed_losses": [float(x) for x in self.smoothed_losses],
            "suggested_lr": float(self.suggested_lr),
            "min_loss_lr": float(self.min_loss_lr),
            "stopped_early": bool(self.stopped_early),
        }


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """float64[steps]: min_lr * (max_lr / min_lr) ** (i / (steps - 1)), from min_lr to max_lr."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(steps - 1, 1))


def smooth_losses(losses, smoothing: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average.  float[S] -> float64[S].

    average_i = smoothing * average_{i-1} + (1 - smoothing) * loss_i (average_{-1} = 0);
    smoothed_i = average_i / (1 - smoothing ** (i + 1)), so smoothed_0 = loss_0.
    """
    losses = np.asarray(losses, np.float64)
    smoothed = np.empty_like(losses)
    average = 0.0
    for i, loss in enumerate(losses):
        average = smoothing * average + (1 - smoothing) * loss
        smoothed[i] = average / (1 - smoothing ** (i + 1))
    return smoothed


def suggest_lr(lrs, smoothed_losses, divisor: float = 10.0) -> float:
    """The LR of the lowest smoothed loss divided by `divisor`, clipped to [lrs[0], lrs[-1]]
    (the rule and its reasons: see the module docstring)."""
    lrs = np.asarray(lrs, np.float64)
    best = int(np.argmin(smoothed_losses))
    return float(np.clip(lrs[best] / divisor, lrs[0], lrs[-1]))


def still_falling_at_the_end(result: LRFindResult) -> bool:
    """True when the sweep ended without the loss turning up: its minimum is in the last 5%
    of the steps and it did not stop early. Then the minimum (and the suggestion) only
    reflect `max_lr`, and a wider sweep is needed."""
    count = len(result.smoothed_losses)
    return not result.stopped_early and int(np.argmin(result.smoothed_losses)) >= count - max(1, count // 20)


def _check_arguments(images, labels, min_lr, max_lr, steps, batch_size, smoothing, divergence_factor, divisor):
    if not 0 < min_lr < max_lr < math.inf:
        raise JaxresError(f"the LR range needs finite 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not 2 <= steps <= MAX_STEPS:
        raise JaxresError(f"the LR range test needs at least 2 steps and at most {MAX_STEPS}, got {steps}")
    if not 0 <= smoothing < 1:
        raise JaxresError(f"smoothing must lie in [0, 1), got {smoothing}")
    if not divergence_factor > 1:
        raise JaxresError(f"divergence_factor must be greater than 1, got {divergence_factor}")
    if not divisor >= 1:
        raise JaxresError(f"suggestion_divisor must be at least 1, got {divisor}")
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise JaxresError(f"images must be [N, H, W, 3] pixel values, got shape {shape}")
    if tuple(np.shape(labels)) != shape[:1]:
        raise JaxresError(f"labels must be [{shape[0]}] class indices, got shape {tuple(np.shape(labels))}")
    if not 1 <= batch_size <= shape[0]:
        raise JaxresError(f"batch_size must lie in [1, {shape[0]}] (the number of images), got {batch_size}")


def lr_range_test(
    model,
    variables,
    images,
    labels,
    *,
    key: jax.Array,
    min_lr: float = 1e-4,
    max_lr: float = 10.0,
    steps: int = 200,
    batch_size: int = 512,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.2,
    suggestion_divisor: float = 10.0,
    progress: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """Run the LR range test on `model` from `variables` (left unchanged) and suggest a peak LR.

    Trains for up to `steps` steps while the LR grows exponentially from `min_lr` to
    `max_lr` (`exponential_lrs`), with the training optimizer (`jaxres.optim.sgd`) and loss
    (`jaxres.optim.smoothed_cross_entropy`), BatchNorm in training mode, and stops early
    once the smoothed loss exceeds `divergence_factor` x its minimum or the loss is not
    finite (that step is not recorded).

    Args:
      model: a jaxres Flax model (`jaxres.models.create_model`).
      variables: its {"params", ["batch_stats"]} to start from (copied, not modified).
      images: uint8 (or float in [0, 255])[N, H, W, 3] pixel values, normalised here as in
        training, not augmented.
      labels: int[N] class indices.
      key: PRNG key of the batch order (random, reshuffled every pass over the images).
      min_lr, max_lr: the first and last LR of the sweep (0 < min_lr < max_lr, finite).
      steps: the number of steps (LRs) to try, at most `MAX_STEPS`.
      batch_size: images per step (at most N).
      smoothing: the EMA factor of `smooth_losses` (0 <= smoothing < 1).
      divergence_factor: stop when the smoothed loss exceeds this times its minimum.
      momentum, nesterov, weight_decay, label_smoothing: the training recipe's.
      suggestion_divisor: the suggestion is the LR of the lowest smoothed loss divided by this.
      progress: if given, `progress(step, lr, loss)` is called on the host after each recorded step.

    Returns:
      An `LRFindResult` (the LRs and losses recorded, the suggestion, whether it stopped early).

    Raises:
      JaxresError: for impossible arguments, or a loss that is not finite at the first step.
    """
    _check_arguments(images, labels, min_lr, max_lr, steps, batch_size, smoothing, divergence_factor, suggestion_divisor)
    lrs = exponential_lrs(min_lr, max_lr, steps)
    config = range_test_recipe(momentum, nesterov, weight_decay, label_smoothing)
    optimizer = _optimizer(float(momentum), bool(nesterov), float(weight_decay))
    images = jnp.asarray(images)
    labels = jnp.asarray(labels, jnp.int32)
    # copies, so that the step can donate them and the caller's variables stay intact
    state = train.init_train_state(config, optimizer, jax.tree_util.tree_map(jnp.array, dict(variables)))
    step = functools.partial(_range_test_step, model=model, optimizer=optimizer, config=config)

    num_images = images.shape[0]
    batches_per_pass = num_images // batch_size
    orders = {}  # pass -> the batch order of that pass over the images

    def batch_of(i):
        position, sweep = i % batches_per_pass, i // batches_per_pass
        if sweep not in orders:
            orders[sweep] = jax.random.permutation(jax.random.fold_in(key, sweep), num_images)
        indices = orders[sweep][position * batch_size : (position + 1) * batch_size]
        return images[indices], labels[indices], jnp.float32(lrs[i])

    watch = _DivergenceWatch(smoothing, divergence_factor, steps, progress, lrs)
    loops.host_loop(step, state, steps, batch_of, stop=watch)
    if not watch.losses:
        raise JaxresError(f"the loss was not finite at the first step (LR {min_lr:g}); lower --min-lr")
    losses = np.asarray(watch.losses, np.float64)
    smoothed_losses = np.asarray(watch.smoothed, np.float64)  # smooth_losses(losses, smoothing), kept as it ran
    taken = lrs[: len(losses)]
    return LRFindResult(
        lrs=taken,
        losses=losses,
        smoothed_losses=smoothed_losses,
        suggested_lr=suggest_lr(taken, smoothed_losses, suggestion_divisor),
        min_loss_lr=float(taken[int(np.argmin(smoothed_losses))]),
        stopped_early=watch.stopped_early,
    )


class _DivergenceWatch:
    """The host's watch over the sweep (`loops.host_loop`'s `stop`): records each step's loss
    in `losses` and its bias-corrected EMA (`smooth_losses`, computed once, online) in
    `smoothed`; stops at a non-finite loss (not recorded) or once the EMA exceeds
    `divergence_factor` x its minimum (recorded)."""

    def __init__(self, smoothing, divergence_factor, steps, progress, lrs):
        self.smoothing, self.divergence_factor, self.steps, self.progress, self.lrs = smoothing, divergence_factor, steps, progress, lrs
        self.average, self.best, self.stopped_early = 0.0, math.inf, False
        self.losses: list[float] = []
        self.smoothed: list[float] = []

    def __call__(self, i: int, loss) -> bool:
        loss = float(loss)
        if not math.isfinite(loss):
            self.stopped_early = True
            return True
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        smoothed = self.average / (1 - self.smoothing ** (i + 1))
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        if self.progress is not None:
            self.progress(i, float(self.lrs[i]), loss)
        if smoothed > self.divergence_factor * self.best:
            self.stopped_early = i < self.steps - 1
            return True
        self.best = min(self.best, smoothed)
        return False


def range_test_recipe(momentum: float, nesterov: bool, weight_decay: float, label_smoothing: float) -> TrainConfig:
    """The `TrainConfig` whose `jaxres.train.train_step` is the range test's step: the given
    hyperparameters, no augmentation, no label mixing, no loss scaling (the model's own
    compute dtype), no lookahead."""
    return TrainConfig(
        momentum=float(momentum), nesterov=bool(nesterov), weight_decay=float(weight_decay),
        label_smoothing=float(label_smoothing), crop_padding=0, flip=False, cutout_size=0, mix="none", precision="fp32",
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _optimizer(momentum: float, nesterov: bool, weight_decay: float) -> optax.GradientTransformation:
    """The training optimizer (`optim.sgd`: coupled weight decay, then (Nesterov) momentum and
    the LR) with its LR a value in the optimizer state (`optax.inject_hyperparams`), set step
    by step. Cached: one object per setting, so the jitted step compiles once for it."""
    return optax.inject_hyperparams(optim.sgd, static_args=("momentum", "nesterov", "weight_decay"))(
        learning_rate=0.0, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "config"), donate_argnums=(0,))
def _range_test_step(state, batch, *, model, optimizer, config):
    """The trainer's step (`jaxres.train.train_step`) at the LR of `batch` = (images uint8[B,
    H, W, 3], labels int32[B], lr float32[]), the LR written into the optimizer state's
    injected hyperparameters first. Returns the new state and the batch's loss before the
    step. Compiled once per (model, optimizer, recipe, batch shape), shared by every sweep (`_optimizer` is cached)."""
    images, labels, lr = batch
    hyperparams = {**state.opt_state.hyperparams, "learning_rate": lr}
    state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))
    state, metrics = train.train_step(
        state, images, labels, jax.random.PRNGKey(0), model=model, optimizer=optimizer, config=config
    )
    return state, metrics["loss"]


# --------------------------------------------------------------------------- from a training config


def range_test_model(config: TrainConfig, num_classes: int):
    """The model the range test trains for the run `config` describes: the run's model,
    computing in its precision, except fp16 in fp32 (the range test has no loss scaling)."""
    if config.precision == "fp16":
        config = dataclasses.replace(config, precision="fp32")
    return backends.model_from_config(config, num_classes)


def range_test_for_config(
    config: TrainConfig,
    dataset,
    *,
    min_lr: float = 1e-4,
    max_lr: float = 10.0,
    steps: int = 200,
    progress: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """The LR range test for the run `config` describes, on `dataset` (a jaxres.data.Dataset).

    Uses the config's model, width, norm, batch size, train subset, momentum, Nesterov,
    weight decay and label smoothing, and the model the run would start from (the same
    init key from `config.seed`); images are normalised, not augmented. Precision: bf16
    runs in bf16, fp16 in fp32 (no loss scaling here), fp32 in fp32 (`range_test_model`).
    """
    data.check_train_subset(config.train_subset, dataset.train.labels.shape[0])
    indices = data.select_train_subset(dataset.train.labels, config.train_subset, config.seed)
    images, labels = dataset.train.images[indices], dataset.train.labels[indices].astype(np.int32)
    model = range_test_model(config, len(dataset.class_names))
    keys = train.run_keys(config.seed)  # the run's own initial model
    variables = models.init_variables(model, keys.init, images.shape[1:])
    return lr_range_test(
        model,
        variables,
        images,
        labels,
        key=train.epoch_key(keys.data, train.LR_RANGE_TEST_STREAM),
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        batch_size=config.batch_size,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        progress=progress,
    )


def suggest_peak_lr(config: TrainConfig, dataset, **options: Any) -> float:
    """The peak LR suggested by the range test for `config` on `dataset` (for `--peak-lr auto`).
    `options` go to `range_test_for_config` (min_lr, max_lr, steps, progress)."""
    return range_test_for_config(config, dataset, **options).suggested_lr


# --------------------------------------------------------------------------- plot


def plot_lr_range(result: LRFindResult):
    """Loss (raw and smoothed) against LR on a log axis, the minimum and the suggestion marked."""

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    axes.plot(result.lrs, result.losses, color="0.7", linewidth=0.8, label="loss per step")
    axes.plot(result.lrs, result.smoothed_losses, color="C0", linewidth=2, label="smoothed loss")
    best = int(np.argmin(result.smoothed_losses))
    axes.plot([result.lrs[best]], [result.smoothed_losses[best]], "o", color="C1", label=f"minimum at LR {result.min_loss_lr:.3g}")
    axes.axvline(result.suggested_lr, color="C3", linestyle="--", label=f"suggested peak LR {result.suggested_lr:.3g}")
    axes.set_xscale("log")
    # from the lowest loss to a little above the start: spikes of the diverging end are cut
    low = min(np.min(result.losses), np.min(result.smoothed_losses))
    high = max(np.max(result.smoothed_losses[: best + 1]), result.losses[0])
    margin = 0.05 * (high - low) + 1e-6
    axes.set_ylim(low - margin, high + 3 * margin)
    title = "LR range test" + (" (stopped: loss diverged)" if result.stopped_early else "")
    axes.set(xlabel="learning rate (log scale)", ylabel="training loss", title=title)
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    return figure


if __name__ == "__main__":  # `python -m jaxres.lr_find`: the command line lives in jaxres.cli
    from jaxres import cli

    sys.exit(cli.lr_find_main())
