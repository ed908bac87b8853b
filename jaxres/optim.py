"""The recipe's mathematics: the one-cycle LR schedule, the label-smoothed cross-entropy, and SGD.

Each is a small pure function, shared by training (`jaxres.train`), evaluation
(`jaxres.evaluate`), the LR range test (`jaxres.lr_find`) and the benchmarks, so that all
of them optimise and report the same objective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def one_cycle_lr(
    peak_lr: float, total_steps: int, peak_step: int, start_factor: float = 0.0, end_factor: float = 0.0
) -> optax.Schedule:
    """Linear start_factor * peak_lr -> peak_lr over [0, peak_step], then linear peak_lr ->
    end_factor * peak_lr at total_steps (the recipe: factors 0; airbench: 0.2 and 0.07).

    step: int[] -> float32[]. Steps past total_steps keep the last value.
    """
    peak_step = int(min(max(peak_step, 0), total_steps))
    rise = optax.linear_schedule(start_factor * peak_lr, peak_lr, max(peak_step, 1))
    fall = optax.linear_schedule(peak_lr, end_factor * peak_lr, max(total_steps - peak_step, 1))
    if peak_step == 0:
        return fall
    return optax.join_schedules([rise, fall], [peak_step])


def decoupled_sgd(lr: float, weight_decay: float, momentum: float, batch_size: int) -> dict:
    """airbench's decoupled hyperparameters converted to SGD's, exactly as its code does.

    `lr` and `weight_decay` are per 1,024 examples and decoupled from the momentum: with
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum)) (how much larger Nesterov's steps are
    than the gradients, for constant gradients), airbench gives torch.optim.SGD
    lr = lr / kilostep_scale and weight_decay = (weight_decay * batch_size / kilostep_scale) / lr
    on a loss *summed* over the batch (legacy/airbench94.py, `main`). jaxres averages the
    loss over the batch, so the same steps take lr * batch_size on the gradient and the same
    coupled decay per step.

    Returns {torch_lr, torch_weight_decay: airbench's torch.optim.SGD arguments (summed
    loss); lr, weight_decay: the same optimizer for a mean loss (`sgd`)}.
    """
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    torch_lr = lr / kilostep_scale
    torch_weight_decay = (weight_decay * batch_size / kilostep_scale) / torch_lr
    return {
        "torch_lr": torch_lr,
        "torch_weight_decay": torch_weight_decay,
        "lr": torch_lr * batch_size,
        "weight_decay": torch_weight_decay / batch_size,
    }


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


def param_group(path: tuple[str, ...]) -> str:
    """The optimizer group of the parameter at `path` (its tree keys):

    "frozen" (never updated: a whitening layer's kernel, computed from the data),
    "whiten_bias" (the whitening layer's bias, trained for `whiten_bias_epochs` only),
    "norm_bias" (a BatchNorm bias: `norm_bias_lr_scale`) or "default"."""
    module, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if module == "whiten":
        return "frozen" if leaf == "kernel" else "whiten_bias"
    if leaf == "bias" and module.startswith("norm"):
        return "norm_bias"
    return "default"


def param_groups(params) -> Any:
    """`param_group` of every leaf of `params`, as a tree of the same structure."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_group(tuple(str(getattr(k, "key", k)) for k in path)), params
    )


def still_groups(config, epoch: int) -> frozenset[str]:
    """The parameter groups (`param_group`) that no update moves in epoch `epoch` (from 0):
    with grouped parameters (`make_optimizer`), "frozen" always and "whiten_bias" from
    `config.whiten_bias_epochs` on; else none. The train step takes no gradient for them
    (`stop_gradients`), so XLA drops the backward work that only they need: the whitening
    kernel's patch product at every step, and once its bias is frozen too, the first block's
    input gradient and the whitening layer's backward pass."""
    if not _uses_groups(config):
        return frozenset()
    return frozenset({"frozen"} | ({"whiten_bias"} if epoch >= config.whiten_bias_epochs else set()))


def stop_gradients(params, groups: frozenset[str]):
    """`params` with `jax.lax.stop_gradient` on every leaf whose `param_group` is in `groups`:
    the same values, zero gradients (their optimizer groups ignore them: `still_groups`)."""
    if not groups:
        return params
    return jax.tree_util.tree_map(
        lambda group, leaf: jax.lax.stop_gradient(leaf) if group in groups else leaf, param_groups(params), params
    )


def _uses_groups(config) -> bool:
    return config.model == "airbench94" or config.norm_bias_lr_scale != 1.0


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer and its learning-rate schedule. config: a `jaxres.config.TrainConfig`.

    `sgd` with the config's momentum, Nesterov and weight decay (converted by
    `decoupled_sgd` when `decoupled_hyperparameters`), over `config.total_steps` steps: the
    LR rises from `lr_start_factor` of its peak to the peak at `config.peak_step`,
    then falls to `lr_end_factor` of it (`one_cycle_lr`). When parameters are grouped
    (`param_group`: airbench94, or `norm_bias_lr_scale` other than 1) each group gets its
    own SGD: BatchNorm biases the LR times `norm_bias_lr_scale` and the weight decay divided
    by it, a whitening bias stops after `whiten_bias_epochs`, frozen parameters never move.
    The schedule returned is the default group's.
    """
    total_steps = config.total_steps(steps_per_epoch)
    peak_step = config.peak_step(steps_per_epoch)
    lr, weight_decay = config.peak_lr, config.weight_decay
    if config.decoupled_hyperparameters:
        converted = decoupled_sgd(lr, weight_decay, config.momentum, config.batch_size)
        lr, weight_decay = converted["lr"], converted["weight_decay"]
    schedule = one_cycle_lr(lr, total_steps, peak_step, config.lr_start_factor, config.lr_end_factor)
    default = sgd(schedule, config.momentum, config.nesterov, weight_decay)
    if not _uses_groups(config):
        return default, schedule
    bias_scale = config.norm_bias_lr_scale
    freeze_step = config.whiten_bias_epochs * steps_per_epoch
    groups = {
        "default": default,
        "norm_bias": sgd(lambda step: schedule(step) * bias_scale, config.momentum, config.nesterov, weight_decay / bias_scale),
        "whiten_bias": optax.chain(
            sgd(schedule, config.momentum, config.nesterov, weight_decay),
            optax.scale_by_schedule(lambda step: jnp.where(step < freeze_step, 1.0, 0.0)),
        ),
        "frozen": optax.set_to_zero(),
    }  # fmt: skip
    return optax.multi_transform(groups, param_groups), schedule


def lookahead_update(step, total_steps: int, every: int, decay: float, average, current):
    """airbench's lookahead after optimizer step `step` (counted from 1; int[]): every `every`
    steps the average a of the weights w moves, a <- d * a + (1 - d) * w, and the weights
    jump to it, w <- a, with d = decay**every * (step / total_steps)**3 (0.95**5 * (step /
    T)**3 in legacy/airbench94.py); after the last step w <- a once more (d = 1, a kept).
    average, current: trees of float arrays (weights and BatchNorm statistics, as airbench
    averages its whole state_dict). Returns the new (average, current); between updates
    both pass through unchanged."""
    periodic = (step % every == 0)
    weight = jnp.asarray(decay**every, jnp.float32) * (jnp.asarray(step, jnp.float32) / total_steps) ** 3

    def one(a, w):
        moved = a + (1 - weight).astype(a.dtype) * (w - a)  # torch's lerp_(w, 1 - weight)
        return jnp.where(periodic, moved, a)

    average = jax.tree_util.tree_map(one, average, current)
    final = step >= total_steps
    current = jax.tree_util.tree_map(lambda a, w: jnp.where(periodic | final, a, w), average, current)
    return average, current
