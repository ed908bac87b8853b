"""The recipe's mathematics: the one-cycle LR schedule, the label-smoothed cross-entropy, and SGD.

Each is a small pure function, shared by training (`jaxres.train`), evaluation
(`jaxres.evaluate`), the LR range test (`jaxres.lr_find`) and the benchmarks, so that all
of them optimise and report the same objective.
"""

from __future__ import annotations

import jax
import optax


def one_cycle_lr(peak_lr: float, total_steps: int, peak_step: int) -> optax.Schedule:
    """Linear 0 -> peak_lr over [0, peak_step], then linear peak_lr -> 0 at total_steps.

    step: int[] -> float32[]. Steps past total_steps get 0.
    """
    peak_step = int(min(max(peak_step, 0), total_steps))
    rise = optax.linear_schedule(0.0, peak_lr, max(peak_step, 1))
    fall = optax.linear_schedule(peak_lr, 0.0, max(total_steps - peak_step, 1))
    if peak_step == 0:
        return fall
    return optax.join_schedules([rise, fall], [peak_step])


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy against targets smoothed by `smoothing`.

    logits: float[N, K]; targets: int32[N] class labels, or float[N, K] soft labels (rows
    summing to 1: RICAP, mixup, CutMix) -> float[N]. The smoothed target is
    (1 - smoothing) * target + smoothing / K, as optax.smooth_labels and torch's
    CrossEntropyLoss(label_smoothing=...) define it. Take `.mean()` for the batch's loss.
    """
    if targets.ndim == logits.ndim - 1:
        targets = jax.nn.one_hot(targets, logits.shape[-1])
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing))


def sgd(learning_rate, momentum: float, nesterov: bool, weight_decay: float) -> optax.GradientTransformation:
    """SGD with coupled weight decay, as torch.optim.SGD(weight_decay=...): the decay is added
    to the gradient before (Nesterov) momentum. learning_rate: a float or an optax schedule."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer (`sgd` with the config's momentum, Nesterov and weight decay) and
    its one-cycle schedule over `config.epochs * steps_per_epoch` steps, peaking at
    `config.resolved_peak_epoch`. config: a `jaxres.config.TrainConfig`."""
    total_steps = config.epochs * steps_per_epoch
    peak_step = int(round(config.resolved_peak_epoch * steps_per_epoch))
    schedule = one_cycle_lr(config.peak_lr, total_steps, peak_step)
    return sgd(schedule, config.momentum, config.nesterov, config.weight_decay), schedule
