"""Training: state, the jitted train/eval steps, the epoch loop, and `python -m jaxres.train`.

Stages of a run (each a function below):

1. data     `load_dataset` -> uint8 arrays on the host, put once on the device(s).
2. state    `init_train_state`: params, batch_stats, optimizer state, loss scale.
3. epoch    `make_train_epoch`: `train_step` over shuffled batches that are gathered
            and augmented on the device; on GPU/TPU one compiled `lax.scan` program per
            epoch, on CPU a host loop of the jitted step (see `resolve_epoch_loop`). The
            host sees only a few scalars per epoch.
4. eval     `make_evaluate`: the jitted evaluation step over the test set, looped the same way.
5. outputs  the checkpoint (with the epoch's metrics row) each epoch, metrics.jsonl
            rewritten from it, PNG plots at the end.

Data parallelism: every array lives on a `Mesh` over all devices (all processes'
devices in a multi-host run, see `initialize_distributed`). The dataset and the state
are replicated; each batch is constrained to be split over the mesh's `batch` axis, so
every device computes its share and XLA inserts the all-reduce of the gradients and of
the BatchNorm statistics (synchronised BatchNorm: the result equals one device's).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxres import augment, checkpoint, models, precision
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError, command_line, describe_os_error

DATA_INFO_NAME = "dataset.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAMES = ("curves.png", "lr_schedule.png", "misclassified.png")
# The files a run writes into its workdir (lr_find.png aside: `--peak-lr auto` writes it before
# the run's own files). A folder holding any of them must be a jaxres run, see `check_workdir`.
RUN_FILES = (checkpoint.CONFIG_NAME, DATA_INFO_NAME, METRICS_NAME, checkpoint.CHECKPOINT_NAME, *PLOT_NAMES)


class NonFiniteLossError(JaxresError):
    """The training loss became NaN or infinite (fp32/bf16; fp16 skips such steps instead)."""


# --------------------------------------------------------------------------- schedule, loss


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


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy against one-hot labels smoothed by `smoothing`.

    logits: float32[N, K]; labels: int32[N] -> float32[]. The target of class c is
    (1 - smoothing) * onehot(c) + smoothing / K, as optax.smooth_labels and
    torch's CrossEntropyLoss(label_smoothing=...) define it.
    """
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (Nesterov) with coupled weight decay, as torch.optim.SGD(weight_decay=...), and its LR schedule."""
    total_steps = config.epochs * steps_per_epoch
    peak_step = int(round(config.resolved_peak_epoch * steps_per_epoch))
    schedule = one_cycle_lr(config.peak_lr, total_steps, peak_step)
    optimizer = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
    return optimizer, schedule


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `step` counts optimizer steps taken (skipped fp16 steps too)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_scale: precision.LossScale


def build_model(config: TrainConfig, num_classes: int):
    return models.create_model(
        config.model,
        num_classes=num_classes,
        width=config.width,
        norm=config.norm,
        dtype=precision.compute_dtype(config.precision),
    )


def init_train_state(config: TrainConfig, model, optimizer, key: jax.Array, image_shape) -> TrainState:
    variables = models.init_variables(model, key, image_shape)
    params = variables["params"]
    scale = (
        precision.init_loss_scale(config.initial_loss_scale)
        if config.precision == "fp16"
        else precision.no_loss_scale()
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        loss_scale=scale,
    )


# --------------------------------------------------------------------------- steps


def train_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    model,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    batch_sharding=None,
) -> tuple[TrainState, dict]:
    """One optimizer step on a batch of raw images.

    images: uint8[B, H, W, 3] (gathered, not yet augmented); labels: int32[B].
    Returns the new state and float32 scalars {loss, accuracy, finite}.
    With fp16, a step whose gradients are not finite leaves params, optimizer state
    and BatchNorm statistics as they were, and backs the loss scale off.
    """
    images = augment.augment_batch(key, images, config.crop_padding, config.flip, config.cutout_size)
    targets = None
    if config.mix != "none":  # soft labels mixed by area (RICAP, CutMix) or weight (mixup)
        num_classes = model.num_classes
        images, targets = augment.mix_batch(
            jax.random.fold_in(key, 1), images, jax.nn.one_hot(labels, num_classes), config.mix, config.mix_alpha
        )
    inputs = augment.normalize(images, dtype=jnp.promote_types(model.dtype, jnp.float32))
    if batch_sharding is not None:
        inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)
    scale = state.loss_scale.scale

    def scaled_loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
        )
        if targets is None:
            loss = smoothed_cross_entropy(logits, labels, config.label_smoothing)
        else:
            smoothed = optax.smooth_labels(targets, config.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, smoothed).mean()
        return loss * scale, (loss, logits, updates["batch_stats"])

    grads, (loss, logits, batch_stats) = jax.grad(scaled_loss, has_aux=True)(state.params)
    grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = precision.all_finite(grads) & jnp.isfinite(loss)

    if config.precision == "fp16":
        params, opt_state, batch_stats = precision.select_tree(
            finite, (params, opt_state, batch_stats), (state.params, state.opt_state, state.batch_stats)
        )
        loss_scale = precision.update_loss_scale(
            state.loss_scale, finite, growth_interval=config.loss_scale_growth_interval
        )
    else:
        loss_scale = state.loss_scale

    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, loss_scale)
    # with mixing, a prediction is right when it names the label with the largest share
    reference = labels if targets is None else jnp.argmax(targets, -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == reference)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}


def resolve_epoch_loop(epoch_loop: str) -> str:
    """"scan" or "steps" for `epoch_loop` in {auto, scan, steps}; auto is steps on CPU, scan elsewhere.

    XLA:CPU runs convolutions inside a while loop (which `lax.scan` becomes) many times
    slower than the same convolutions outside one (jax-ml/jax#12868; measured with the
    XLA defaults of jaxres.runtime, width 0.25, batch 128, 2-core AMD EPYC: 2.6 img/s in a
    scan against 68 img/s stepped, the two measured back to back on a loaded machine, ~25x),
    so on CPU the epoch is a Python loop of the jitted step,
    dispatched asynchronously with the data still on the device.
    """
    if epoch_loop == "auto":
        return "steps" if jax.default_backend() == "cpu" else "scan"
    return epoch_loop


def make_train_epoch(
    model,
    optimizer,
    config: TrainConfig,
    mesh: Mesh,
    steps_per_epoch: int,
    progress: Callable[[Any], None] | None = None,
):
    """`train_epoch(state, images, labels, key) -> (state, metrics)`, compiled.

    images: uint8[N, H, W, 3] and labels: int32[N] (replicated on the mesh). Each epoch
    shuffles with `key`, drops the last partial batch, and runs `train_step` over
    `steps_per_epoch` batches, gathered and augmented on the device. metrics: {loss,
    accuracy (means over steps), loss_scale, skipped_steps, first_nonfinite_step (-1 if
    none)}. `progress`, if given, is called on the host with the step index after each
    step (a `jax.debug.callback`). The state buffers are donated.

    With `config.epoch_loop` "scan" the epoch is one program (a `lax.scan` over the
    steps); with "steps" it is a host loop over one jitted step; both compute the same.
    """
    batch_sharding = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())  # every process can read every output (multi-host)
    step_fn = functools.partial(
        train_step, model=model, optimizer=optimizer, config=config, batch_sharding=batch_sharding
    )

    def shuffled_batches(key, num_images):
        permutation_key, augment_key = jax.random.split(key)
        order = jax.random.permutation(permutation_key, num_images)
        batches = order[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, config.batch_size)
        return batches, augment_key

    def one_step(state, images, labels, batch_indices, step_index, augment_key):
        batch_indices = jax.lax.with_sharding_constraint(batch_indices, batch_sharding)
        step_key = jax.random.fold_in(augment_key, step_index)
        state, metrics = step_fn(state, images[batch_indices], labels[batch_indices], step_key)
        if progress is not None:
            jax.debug.callback(progress, step_index)
        return state, metrics

    def summarize(state, per_step):
        nonfinite = ~per_step["finite"]
        return {
            "loss": per_step["loss"].mean(),
            "accuracy": per_step["accuracy"].mean(),
            "loss_scale": state.loss_scale.scale,
            "skipped_steps": nonfinite.sum(),
            "first_nonfinite_step": jnp.where(nonfinite.any(), jnp.argmax(nonfinite), -1),
        }

    if resolve_epoch_loop(config.epoch_loop) == "scan":

        def scanned_epoch(state, images, labels, key):
            batches, augment_key = shuffled_batches(key, images.shape[0])

            def body(state, inputs):
                step_index, batch_indices = inputs
                return one_step(state, images, labels, batch_indices, step_index, augment_key)

            state, per_step = jax.lax.scan(body, state, (jnp.arange(steps_per_epoch), batches))
            return state, summarize(state, per_step)

        return jax.jit(scanned_epoch, donate_argnums=(0,), out_shardings=replicated)

    shuffle = jax.jit(shuffled_batches, static_argnums=1, out_shardings=replicated)
    step = jax.jit(one_step, donate_argnums=(0,), out_shardings=replicated)
    finish = jax.jit(
        lambda state, per_step: summarize(state, jax.tree_util.tree_map(lambda *x: jnp.stack(x), *per_step)),
        out_shardings=replicated,
    )

    def stepped_epoch(state, images, labels, key):
        batches, augment_key = shuffle(key, images.shape[0])
        per_step = []
        for step_index in range(steps_per_epoch):
            state, metrics = step(state, images, labels, batches[step_index], step_index, augment_key)
            per_step.append(metrics)
        return state, finish(state, per_step)

    return stepped_epoch


def shift_images(inputs: jax.Array, dy: int, dx: int) -> jax.Array:
    """Translate by (dy, dx) pixels, filling with zeros (the mean colour once normalised).

    inputs: float[N, H, W, C] -> float[N, H, W, C].
    """
    if dy == 0 and dx == 0:
        return inputs
    height, width = inputs.shape[1:3]
    pad = max(abs(dy), abs(dx))
    padded = jnp.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width, :]


TTA_SHIFTS = {"none": [(0, 0)], "flip": [(0, 0)], "flip_translate": [(0, 0), (1, 1), (-1, -1)]}


def predict_logits(model, variables, inputs: jax.Array, tta: str = "none") -> jax.Array:
    """Inference-mode logits, averaged over test-time augmentations.

    inputs: float32[N, H, W, 3] (normalised) -> float32[N, K]. tta: "none"; "flip" (the
    image and its mirror); "flip_translate" (both, each also shifted by (1, 1) and
    (-1, -1) pixels: 6 views). The mean is taken over logits.
    """
    views = []
    for dy, dx in TTA_SHIFTS[tta]:
        shifted = shift_images(inputs, dy, dx)
        views.append(shifted)
        if tta != "none":
            views.append(shifted[:, :, ::-1, :])
    logits = [model.apply(variables, view, train=False) for view in views]
    return sum(logits) / len(logits)


def make_evaluate(model, config: TrainConfig, mesh: Mesh, tta: str | None = None):
    """`evaluate(variables, images, labels) -> {loss, accuracy, predictions}`, compiled.

    images: uint8[N, H, W, 3]; labels: int32[N]. Runs in batches of eval_batch_size
    (the last one padded and masked) with BatchNorm in inference mode and the test-time
    augmentation `tta` (default `config.tta`; see `predict_logits`). loss is the
    training criterion (label-smoothed cross-entropy) averaged over the N images;
    predictions: int32[N]. Batches run in a `lax.scan` or a host loop, as
    `config.epoch_loop` says (see `resolve_epoch_loop`).
    """
    tta = config.tta if tta is None else tta
    batch_size = config.eval_batch_size
    batch_sharding = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())

    def padded_batches(images, labels):
        n = images.shape[0]
        num_batches = -(-n // batch_size)
        pad = num_batches * batch_size - n
        shape = lambda x: x.reshape(num_batches, batch_size, *x.shape[1:])  # noqa: E731
        valid = jnp.arange(num_batches * batch_size) < n
        images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
        return shape(images), shape(jnp.pad(labels, (0, pad))), shape(valid)

    def evaluate_batch(variables, batch_images, batch_labels, batch_valid):
        inputs = jax.lax.with_sharding_constraint(augment.normalize(batch_images), batch_sharding)
        logits = predict_logits(model, variables, inputs, tta)
        targets = optax.smooth_labels(jax.nn.one_hot(batch_labels, logits.shape[-1]), config.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        predictions = jnp.argmax(logits, -1).astype(jnp.int32)
        correct = (predictions == batch_labels) & batch_valid
        return jnp.where(batch_valid, losses, 0.0).sum(), correct.sum(), predictions

    def summarize(n, loss_sums, correct, predictions):
        return {
            "loss": loss_sums.sum() / n,
            "accuracy": correct.sum() / n,
            "predictions": predictions.reshape(-1)[:n],
        }

    if resolve_epoch_loop(config.epoch_loop) == "scan":

        def scanned(variables, images, labels):
            batches = padded_batches(images, labels)
            _, outputs = jax.lax.scan(lambda _, batch: (None, evaluate_batch(variables, *batch)), None, batches)
            return summarize(images.shape[0], *outputs)

        return jax.jit(scanned, out_shardings=replicated)

    pad = jax.jit(padded_batches, out_shardings=replicated)
    run_batch = jax.jit(
        lambda variables, batches, index: evaluate_batch(variables, *(x[index] for x in batches)),
        out_shardings=replicated,
    )
    finish = jax.jit(
        lambda n, outputs: summarize(n, *(jnp.stack(x) for x in zip(*outputs))),
        static_argnums=0,
        out_shardings=replicated,
    )

    def stepped(variables, images, labels):
        batches = pad(images, labels)
        outputs = [run_batch(variables, batches, index) for index in range(batches[0].shape[0])]
        return finish(images.shape[0], outputs)

    return stepped


# --------------------------------------------------------------------------- devices


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None):
    """Join a multi-host run through `jax.distributed.initialize` (no-op for one process).

    On CPU the collectives go through gloo. Must run before any other JAX call.
    """
    if num_processes is None or num_processes <= 1:
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option absent on some builds; GPU/TPU do not need it
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh() -> Mesh:
    """A 1-D mesh named `batch` over every device of every process."""
    return Mesh(np.array(jax.devices()), ("batch",))


def replicate(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """Place a host array on every device of the mesh (works across processes)."""
    sharding = NamedSharding(mesh, P())
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def replicate_tree(mesh: Mesh, tree):
    return jax.tree_util.tree_map(lambda x: replicate(mesh, np.asarray(x)), tree)


# --------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    config: TrainConfig


def select_train_subset(labels: np.ndarray, subset: int | None, seed: int) -> np.ndarray:
    """Indices of the training images to use: all, or `subset` of them drawn with `seed` (sorted)."""
    n = labels.shape[0]
    if subset is None or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])


def load_data(config: TrainConfig, progress: bool):
    from jaxres import data

    return data.load_dataset(config.data, cache_dir=config.cache_dir, progress=progress)


def metrics_text(history: list[dict]) -> str:
    """metrics.jsonl's text: one JSON object per row; a non-finite number (an fp16 epoch's mean
    loss over skipped steps, say) is written as null, since strict JSON has no NaN."""

    def strict(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return "".join(json.dumps({k: strict(v) for k, v in row.items()}, allow_nan=False) + "\n" for row in history)


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, null read back as NaN. (A run's own record of them is
    its checkpoint; `--resume` rewrites metrics.jsonl from there.)"""
    path = Path(workdir) / METRICS_NAME
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise JaxresError(
                f"{path} line {number} is not valid JSON ({error}); --resume rewrites the file from the checkpoint"
            ) from None
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


def _read_json_object(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JaxresError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise JaxresError(f"{path} is not a JSON object")
    return values


def read_dataset_info(workdir: str | Path) -> dict:
    """The run's dataset.json: class_names, image_shape, source, image counts."""
    path = Path(workdir) / DATA_INFO_NAME
    if not path.is_file():
        raise JaxresError(f"no {DATA_INFO_NAME} in {workdir}: is it a jaxres run directory?")
    info = _read_json_object(path)
    names, shape = info.get("class_names"), info.get("image_shape")
    if not (isinstance(names, list) and names and isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and n > 0 for n in shape)):  # fmt: skip
        raise JaxresError(f"{path} is not a jaxres dataset.json: it needs class_names and image_shape [H, W, C]")
    return info


def check_workdir(workdir: Path, resume: bool, *, writable: bool = True) -> None:
    """Check, before any data is loaded, that the run may use `workdir`.

    A run starts in a missing or empty folder, or one that is a jaxres run without a
    checkpoint (killed before its first epoch ended); it resumes only from a checkpoint. A
    folder holding run files (config.json, metrics.jsonl, ...) without a jaxres config.json is
    someone else's: refused, never overwritten. `writable`: also create the folder and write a
    probe file in it (the process that writes the run's files).
    """
    if workdir.exists() and not workdir.is_dir():
        raise JaxresError(f"--workdir {workdir} is a file, not a folder")
    present = [name for name in RUN_FILES if (workdir / name).exists()]
    if present:
        try:
            checkpoint.load_config(workdir)
        except JaxresError as error:
            raise JaxresError(
                f"--workdir {workdir} holds {', '.join(present)} but is not a jaxres run ({error}); "
                "refusing to overwrite its files: choose another --workdir"
            ) from None
    has_checkpoint = checkpoint.checkpoint_path(workdir).is_file()
    if has_checkpoint and not resume:
        raise JaxresError(
            f"{workdir} already holds a checkpoint; pass --resume to continue it, or choose another --workdir"
        )
    if resume and not has_checkpoint:
        why = "it does not exist" if not workdir.exists() else f"it holds no {checkpoint.CHECKPOINT_NAME}"
        raise JaxresError(f"nothing to resume in {workdir}: {why}; start the run without --resume")
    if writable:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=workdir):
                pass
        except OSError as error:
            raise JaxresError(f"cannot write to --workdir {workdir}: {describe_os_error(error)}") from None


def stop_advice(config: TrainConfig, workdir: Path, epochs_saved: int) -> str:
    """What is left and what to try, after a run stopped on non-finite numbers."""
    kept = (
        f"The last good checkpoint (epoch {epochs_saved}) in {workdir} is intact."
        if epochs_saved > 0
        else "No checkpoint was written (no epoch finished well)."
    )
    remedies = ["a lower --peak-lr"] + ([] if config.precision == "fp32" else ["--precision fp32"])
    return f"{kept} Try {' or '.join(remedies)}."


def check_epoch_is_finite(config: TrainConfig, workdir: Path, epoch: int, metrics: dict, steps_per_epoch: int) -> None:
    """Raise NonFiniteLossError when the epoch numbered `epoch` (from 1) met a non-finite loss
    (fp32, bf16) or trained on nothing (fp16: every step skipped, the loss scale shrinking).
    metrics: the epoch's summary (see `make_train_epoch`)."""
    if config.precision != "fp16" and int(metrics["first_nonfinite_step"]) >= 0:
        raise NonFiniteLossError(
            f"the training loss became non-finite at epoch {epoch}, step "
            f"{int(metrics['first_nonfinite_step']) + 1}; stopping. " + stop_advice(config, workdir, epoch - 1)
        )
    if int(metrics["skipped_steps"]) == steps_per_epoch:
        raise NonFiniteLossError(
            f"every one of the {steps_per_epoch} steps of epoch {epoch} was skipped: its gradients were not finite "
            f"(the loss scale is down to {float(metrics['loss_scale']):g}); stopping. "
            + stop_advice(config, workdir, epoch - 1)
        )


def check_same_dataset(workdir: Path, info: dict) -> None:
    """Raise JaxresError when the data a run resumes on differs from the data it began with
    (its dataset.json): other classes, image shape or image counts."""
    path = workdir / DATA_INFO_NAME
    saved = read_dataset_info(workdir) if path.is_file() else info
    changed = [key for key in ("class_names", "image_shape", "train_images", "test_images") if saved.get(key) != info[key]]
    if changed:
        raise JaxresError(f"cannot resume {workdir}: the data differs from its {DATA_INFO_NAME} in {', '.join(changed)}")


def initial_state_template(config: TrainConfig, model, image_shape) -> TrainState:
    """A freshly initialised state with the structure of the run's checkpoints."""
    optimizer, _ = make_optimizer(config, steps_per_epoch=1)
    return init_train_state(config, model, optimizer, jax.random.PRNGKey(config.seed), image_shape)


def format_row(row: dict) -> str:
    return (
        f"{row['epoch']:>5d} {row['lr']:>8.4f} {row['train_loss']:>10.4f} {100 * row['train_accuracy']:>9.2f}"
        f" {row['test_loss']:>9.4f} {100 * row['test_accuracy']:>8.2f} {row['seconds']:>8.1f}"
        f" {row['images_per_second']:>9.0f} {row['loss_scale']:>10.0f} {row['compile_seconds']:>9.1f}"
    )


TABLE_HEADER = (
    f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} {'test_acc':>8}"
    f" {'seconds':>8} {'img/s':>9} {'loss_scale':>10} {'compile_s':>9}"
)


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling while `measuring`.

    Reads `jax.monitoring`'s compile events, so the first epoch's time can be split into
    compilation and training (throughput never includes compilation).
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )
    _active: list["CompileClock"] = []
    _registered = False

    def __init__(self):
        self.seconds = 0.0

    @classmethod
    def _listen(cls, event: str, duration: float, **_) -> None:
        if event in cls.EVENTS:
            for clock in cls._active:
                clock.seconds += duration

    def __enter__(self) -> "CompileClock":
        if not CompileClock._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileClock._listen)
            CompileClock._registered = True
        self.seconds = 0.0
        CompileClock._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        CompileClock._active.remove(self)


class EpochProgress:
    """A tqdm bar per epoch, advanced from inside the compiled epoch through `update`."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.bar = None

    def start(self, epoch: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}", leave=False, file=sys.stderr, unit="step")

    def update(self, step_index) -> None:
        if self.bar is not None:
            self.bar.n = int(step_index) + 1
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_and_evaluate(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset=None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
    write_plots: bool = True,
    mesh: Mesh | None = None,
) -> RunResult:
    """Run (or resume) the training described by `config`; write everything to its workdir.

    dataset: a `jaxres.data.Dataset` to use instead of loading `config.data` (tests).
    progress: show a progress bar per epoch; default: when stderr is a terminal.
    stop_after_epoch: end the run early after this many epochs (to simulate an interruption).
    mesh: the devices to use (default: all of them, `make_mesh()`).
    """
    is_main = jax.process_index() == 0
    if progress is None:
        progress = sys.stderr.isatty()
    workdir = Path(config.workdir)
    check_workdir(workdir, resume, writable=is_main)
    if resume:
        saved = checkpoint.load_config(workdir)
        if dataclasses.replace(saved, workdir=config.workdir) != config:
            differences = [
                f.name
                for f in dataclasses.fields(config)
                if f.name != "workdir" and getattr(saved, f.name) != getattr(config, f.name)
            ]
            raise JaxresError(
                f"cannot resume {workdir}: its config.json differs in {', '.join(differences)}; "
                "resume with the same options (or omit them: --resume alone reuses the saved ones)"
            )
        saved_state, history = checkpoint.read_checkpoint(workdir)  # verified before any data is loaded
    else:
        saved_state, history = None, []

    # 1. data
    if dataset is None:
        dataset = load_data(config, progress=progress and is_main)
    train_indices = select_train_subset(dataset.train.labels, config.train_subset, config.seed)
    train_images = dataset.train.images[train_indices]
    train_labels = dataset.train.labels[train_indices].astype(np.int32)
    image_shape = train_images.shape[1:]
    num_classes = len(dataset.class_names)
    mesh = make_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    if config.batch_size % devices or config.eval_batch_size % devices:
        raise JaxresError(
            f"batch_size ({config.batch_size}) and eval_batch_size ({config.eval_batch_size}) must be "
            f"multiples of the device count ({devices})"
        )
    steps_per_epoch = train_images.shape[0] // config.batch_size
    if steps_per_epoch == 0:
        raise JaxresError(
            f"the training set has {train_images.shape[0]} images, fewer than one batch of {config.batch_size}"
        )
    train_images_device = replicate(mesh, train_images)
    train_labels_device = replicate(mesh, train_labels)
    test_images_device = replicate(mesh, dataset.test.images)
    test_labels_device = replicate(mesh, dataset.test.labels.astype(np.int32))

    # 2. state
    model = build_model(config, num_classes)
    optimizer, schedule = make_optimizer(config, steps_per_epoch)
    root_key = jax.random.PRNGKey(config.seed)
    init_key, data_key = jax.random.split(root_key)
    state = init_train_state(config, model, optimizer, init_key, image_shape)
    info = {
        "class_names": list(dataset.class_names),
        "image_shape": list(image_shape),
        "source": dataset.source,
        "train_images": int(train_images.shape[0]),
        "test_images": int(dataset.test.images.shape[0]),
    }
    if resume:
        check_same_dataset(workdir, info)
        state = checkpoint.fit_state_dict(checkpoint.checkpoint_path(workdir), saved_state, state)
        if int(state.step) != len(history) * steps_per_epoch:
            raise JaxresError(
                f"cannot resume {workdir}: its checkpoint is at step {int(state.step)}, not at the end of its "
                f"epoch {len(history)} of {steps_per_epoch} steps (did the training set change?)"
            )
        log(f"resumed {workdir} at epoch {len(history)}")
    start_epoch = len(history)
    state = replicate_tree(mesh, state)

    # Crash safety: each epoch's state and metrics row are committed together, by the one
    # atomic rename of the checkpoint (its history holds every row). metrics.jsonl is only a
    # copy of that history, rewritten atomically after the checkpoint and here at every
    # (re)start: a kill between the two renames leaves metrics.jsonl one row short, and the
    # next start restores exactly the checkpoint's rows, never losing or repeating one.
    if is_main:
        checkpoint.remove_stale_temporaries(workdir, RUN_FILES)
        checkpoint.atomic_write_bytes(workdir / checkpoint.CONFIG_NAME, config.to_json().encode())
        checkpoint.atomic_write_bytes(workdir / DATA_INFO_NAME, json.dumps(info, indent=2).encode())
        checkpoint.atomic_write_bytes(workdir / METRICS_NAME, metrics_text(history).encode())

    evaluate = make_evaluate(model, config, mesh)
    log(
        f"training {config.model} (width {config.width}, {config.precision}) on {dataset.source}: "
        f"{train_images.shape[0]} train / {dataset.test.images.shape[0]} test images, "
        f"{steps_per_epoch} steps of {config.batch_size} per epoch, {devices} device(s)"
    )
    log(TABLE_HEADER)
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    predictions = None
    bar = EpochProgress(steps_per_epoch) if progress and is_main else None
    train_epoch = make_train_epoch(
        model, optimizer, config, mesh, steps_per_epoch, progress=bar.update if bar else None
    )
    for epoch in range(start_epoch, last_epoch):
        if bar is not None:
            bar.start(epoch + 1)
        started = time.perf_counter()
        with CompileClock() as compile_clock:
            state, metrics = train_epoch(
                state, train_images_device, train_labels_device, jax.random.fold_in(data_key, epoch)
            )
            metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - started - compile_clock.seconds
        if bar is not None:
            bar.close()
        check_epoch_is_finite(config, workdir, epoch + 1, metrics, steps_per_epoch)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        evaluation = jax.device_get(evaluate(variables, test_images_device, test_labels_device))
        if not math.isfinite(float(evaluation["loss"])):
            raise NonFiniteLossError(
                f"the test loss after epoch {epoch + 1} is {float(evaluation['loss'])}; stopping. "
                + stop_advice(config, workdir, epoch)
            )
        predictions = evaluation["predictions"]
        row = {
            "epoch": epoch + 1,
            "lr": float(schedule((epoch + 1) * steps_per_epoch - 1)),
            "train_loss": float(metrics["loss"]),
            "train_accuracy": float(metrics["accuracy"]),
            "test_loss": float(evaluation["loss"]),
            "test_accuracy": float(evaluation["accuracy"]),
            "seconds": seconds,
            "images_per_second": steps_per_epoch * config.batch_size / seconds,
            "loss_scale": float(metrics["loss_scale"]),
            "skipped_steps": int(metrics["skipped_steps"]),
            "compile_seconds": compile_clock.seconds,
        }
        history.append(row)
        log(format_row(row))
        if is_main:
            try:
                checkpoint.save_checkpoint(workdir, jax.device_get(state), history)
                checkpoint.atomic_write_bytes(workdir / METRICS_NAME, metrics_text(history).encode())
            except OSError as error:  # a full disk, say: the renamed-over files are still whole
                kept = (
                    f"the last checkpoint in {workdir} is whole (make room, then continue with --resume)"
                    if checkpoint.checkpoint_path(workdir).is_file()
                    else "no checkpoint was written (make room, then start again)"
                )
                raise JaxresError(f"cannot save epoch {epoch + 1}: {describe_os_error(error)}; {kept}") from None

    if is_main and write_plots and history:
        if predictions is None:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            predictions = jax.device_get(evaluate(variables, test_images_device, test_labels_device))["predictions"]
        _write_plots(workdir, config, history, schedule, steps_per_epoch, dataset, predictions)
    return RunResult(state=state, history=history, config=config)


def _write_plots(workdir, config, history, schedule, steps_per_epoch, dataset, predictions):
    from jaxres import plots

    plots.save_figure(plots.plot_training_curves(history), workdir / "curves.png")
    plots.save_figure(
        plots.plot_lr_schedule(schedule, config.epochs * steps_per_epoch, steps_per_epoch), workdir / "lr_schedule.png"
    )
    wrong = np.flatnonzero(predictions != dataset.test.labels)
    if wrong.size > config.misclassified_to_plot:  # a seeded sample, so every class can show up
        wrong = np.sort(np.random.default_rng(config.seed).choice(wrong, config.misclassified_to_plot, replace=False))
    if wrong.size:
        figure = plots.plot_misclassified(
            dataset.test.images[wrong], dataset.test.labels[wrong], predictions[wrong], dataset.class_names
        )
        plots.save_figure(figure, workdir / "misclassified.png")


# --------------------------------------------------------------------------- command line

FLAG_HELP = {
    "data": "dataset: 'cifar10' (TFDS), 'shapes' (synthetic, offline), or a path to cifar-10-python.tar.gz, "
    "cifar-10-batches-py/, an image folder ROOT/{train,test}/<class>/*, or a .tar(.gz) of one",
    "cache_dir": "where decoded arrays are cached (default: $JAXRES_CACHE or ~/.cache/jaxres)",
    "train_subset": "train on this many training images only (a seeded random subset)",
    "model": f"model architecture: {', '.join(sorted(models.MODELS))}",
    "width": "channel width multiplier (0.25 trains quickly on a CPU)",
    "norm": f"normalisation layer: {', '.join(models.NORMS)}",
    "epochs": "number of epochs",
    "batch_size": "training batch size (a multiple of the device count)",
    "peak_lr": "peak learning rate of the one-cycle schedule (also --max-lr); 'auto' runs the LR range "
    "test (jaxres.lr_find) on a fresh model first and uses its suggestion",
    "peak_epoch": "epoch at which the LR peaks (default: 5/24 of the run, i.e. 5 of 24)",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay added to the gradient (as torch.optim.SGD)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "crop_padding": "pad-and-random-crop padding in pixels (0 disables)",
    "flip": "random horizontal flips",
    "cutout_size": "side of the cutout square in pixels (0 disables)",
    "mix": "label-mixing augmentation: none, ricap (Takahashi et al. 2018), mixup or cutmix",
    "mix_alpha": "RICAP's beta, or mixup's / CutMix's alpha (default: 0.3 for ricap, 1.0 otherwise)",
    "precision": "compute precision: fp32, bf16, or fp16 with dynamic loss scaling",
    "initial_loss_scale": "fp16 only: the initial dynamic loss scale",
    "loss_scale_growth_interval": "fp16 only: finite steps before the loss scale doubles",
    "epoch_loop": "how an epoch runs: one compiled lax.scan ('scan'), a host loop of the jitted step "
    "('steps'), or 'auto' (steps on CPU, where XLA runs convolutions in loops slowly; scan elsewhere)",
    "tta": "test-time augmentation at evaluation: none, flip (mean logits of image and mirror), "
    "or flip_translate (also shifted by 1 pixel diagonally both ways: 6 views)",
    "seed": "random seed (same seed, same result on CPU)",
    "eval_batch_size": "evaluation batch size",
    "workdir": "output directory: config.json, metrics.jsonl, checkpoint, plots",
    "misclassified_to_plot": "number of misclassified test images in misclassified.png",
}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _float_or_auto(text: str):
    return AUTO if text.lower() == AUTO else float(text)


_float_or_auto.__name__ = "float or 'auto'"
AUTO = "auto"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxres.train",
        description="Train the custom ResNet (ResNet-9) on CIFAR-10 with a one-cycle schedule, "
        "label smoothing and on-device augmentation. Defaults are the original 24-epoch recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=FLAG_HELP[field.name])
            continue
        parse = _optional(kind) if type(None) in typing.get_args(hint) else kind
        flags = [flag]
        if field.name == "peak_lr":  # the one-cycle schedule's maximum: --max-lr is the same flag
            flags.append("--max-lr")
            parse = _float_or_auto
        parser.add_argument(*flags, type=parse, default=None, metavar=field.name.upper(), help=FLAG_HELP[field.name])
    for field in dataclasses.fields(TrainConfig):  # show the recipe's defaults in --help
        action = next(a for a in parser._actions if a.dest == field.name)
        action.help = f"{action.help} (default: {field.default})"
    parser.formatter_class = argparse.HelpFormatter
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir from its checkpoint")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar per epoch (default: when stderr is a terminal)",
    )
    distributed = parser.add_argument_group("multi-host (see README)")
    distributed.add_argument("--coordinator-address", help="host:port of process 0 (jax.distributed.initialize)")
    distributed.add_argument("--num-processes", type=int, help="number of processes in the run")
    distributed.add_argument("--process-id", type=int, help="this process's index")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The config the flags ask for: flags given, else the saved config when resuming, else defaults.

    Also says whether the peak LR is still to be found by the range test (`--peak-lr auto`);
    when resuming, the saved run's peak LR stands (it was found, or given, when the run began).
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    auto_lr = given.get("peak_lr") == AUTO
    if auto_lr:
        del given["peak_lr"]
    workdir = given.get("workdir", TrainConfig.workdir)
    saved_path = Path(workdir) / checkpoint.CONFIG_NAME
    if args.resume and saved_path.is_file():
        saved = dataclasses.asdict(TrainConfig.load(saved_path))
        return TrainConfig.from_dict({**saved, **given, "workdir": workdir}), False
    return TrainConfig.from_dict(given), auto_lr


def find_peak_lr(config: TrainConfig, dataset, log: Callable[[str], None] = print) -> TrainConfig:
    """`config` with the peak LR the LR range test suggests for it (`--peak-lr auto`).

    The sweep (jaxres.lr_find.range_test_for_config, its default range and steps) starts
    from the same initial model as the run; its plot is written to WORKDIR/lr_find.png.
    """
    from jaxres import lr_find
    from jaxres.plots import save_figure

    result = lr_find.range_test_for_config(config, dataset)
    if jax.process_index() == 0:
        workdir = Path(config.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        save_figure(lr_find.plot_lr_range(result), workdir / "lr_find.png")
    log(
        f"LR range test: lowest smoothed loss at LR {result.min_loss_lr:.3g}; "
        f"peak LR set to {result.suggested_lr:.4g} (plot: {Path(config.workdir) / 'lr_find.png'})"
    )
    return dataclasses.replace(config, peak_lr=float(result.suggested_lr))


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        config, auto_lr = config_from_args(args)
        is_main = jax.process_index() == 0
        log = print if is_main else (lambda _: None)
        dataset = None
        check_workdir(Path(config.workdir), args.resume, writable=is_main)  # before any data is loaded
        if auto_lr:
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            dataset = load_data(config, progress=progress and is_main)
            config = find_peak_lr(config, dataset, log)
        result = train_and_evaluate(config, resume=args.resume, dataset=dataset, progress=args.progress, log=log)
    except KeyboardInterrupt:
        if checkpoint.checkpoint_path(args.workdir or TrainConfig.workdir).is_file():
            print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        else:
            print("interrupted before the first checkpoint; start the run again", file=sys.stderr)
        return 130
    if result.history and jax.process_index() == 0:
        final = result.history[-1]
        print(f"final test accuracy {100 * final['test_accuracy']:.2f}% — outputs in {config.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
