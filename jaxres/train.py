"""Training: the state, the one train step, the epoch, and `train_and_evaluate`.

A batch walks straight down: data (`jaxres.data`) -> augment (`jaxres.augment`) -> model
(`jaxres.models`) -> loss and optimizer (`jaxres.optim`) -> metrics -> the run directory
(`jaxres.rundir`). This module is the one place that wires them:

1. prepare  `prepare_run`: the convolution backend resolved, the model, optimizer and
            schedule, the epoch loop chosen (`jaxres.loops.choose_loop`), the data put
            once on the device(s), the run's PRNG keys (`run_keys`).
2. state    `init_train_state` (params, batch_stats, optimizer state, loss scale), or the
            checkpoint restored into it (`restore_or_initialise`).
3. epoch    `make_train_epoch`: `train_step` over shuffled batches gathered and augmented
            on the device, as one `lax.scan` program or a host loop (`jaxres.loops`). The
            host sees only a few scalars per epoch.
4. eval     `jaxres.evaluate.make_evaluate`: the test set, in the same loop.
5. outputs  the checkpoint (with the epoch's metrics row) each epoch, metrics.jsonl
            rewritten from it, PNG plots at the end (`jaxres.rundir`, `jaxres.plots`).

`train_epochs` runs stages 3 and 4 epoch after epoch; `train_and_evaluate` adds the run
directory around it, and the benchmarks' time-to-accuracy uses it as it is. Data
parallelism over every device is described in `jaxres.parallel`. The command line is
`python -m jaxres.train` (`jaxres.cli`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxres import airbench, augment, backends, data, evaluate, loops, models, monitoring, optim, parallel, plots, precision, rundir
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError
from jaxres.monitoring import TABLE_HEADER, CompileClock, EpochProgress, format_row


# --------------------------------------------------------------------------- keys and state


class RunKeys(NamedTuple):
    """The PRNG keys of a run with seed s: `init` initialises the model, `data` shuffles and
    augments (epoch e draws from `epoch_key(data, e)`; the LR range test from
    `epoch_key(data, LR_RANGE_TEST_STREAM)`)."""

    init: jax.Array
    data: jax.Array


# The stream of the LR range test's batch order: fold_in(keys.data, this), no epoch's.
LR_RANGE_TEST_STREAM = 0x1F
# The key of `alternating_flip`'s per-image coins: fold_in(PRNGKey(seed), this), fixed for the run.
ALTERNATING_FLIP_STREAM = 0x666C6970


def run_keys(seed: int) -> RunKeys:
    """The one derivation of a run's keys from its seed: split(PRNGKey(seed))."""
    init, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return RunKeys(init, data_key)


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The key of epoch `epoch` (counted from 0): its shuffle and its augmentations."""
    return jax.random.fold_in(data_key, epoch)


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as arrays: `step` (optimizer steps taken, skipped fp16
    steps too), params, batch_stats, opt_state, the fp16 `loss_scale`
    (`jaxres.precision.LossScale`, whose docstring says why it is not flax's DynamicScale)
    and `lookahead` (with `lookahead_every`, the moving average {params, batch_stats} of
    `jaxres.optim.lookahead_update`; else None).

    Why not flax's `train_state.TrainState` (as the Flax ImageNet example subclasses it):
    that one carries the optimizer (`tx`) and `apply_fn` as static fields of the pytree, so
    the states of two runs built with equal but distinct optimizer objects have different
    tree structures: they cannot be compared or mapped over together (the resume and
    determinism tests compare whole states of two runs), and every new optimizer object is
    a new cache key for jit. Here the optimizer and the model are arguments of the
    programs that use them; tests/test_train.py shows the difference.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_scale: precision.LossScale
    lookahead: Any = None


def init_train_state(config: TrainConfig, optimizer: optax.GradientTransformation, variables: dict) -> TrainState:
    """The state at step 0 from model `variables` ({"params", optional "batch_stats"}: a random
    init from `models.init_variables`, or converted weights): a fresh optimizer state, and the
    fp16 loss scale at `config.initial_loss_scale` (no scaling for fp32 and bf16)."""
    params = variables["params"]
    scale = (
        precision.init_loss_scale(config.initial_loss_scale)
        if config.precision == "fp16"
        else precision.no_loss_scale()
    )
    batch_stats = variables.get("batch_stats", {})
    lookahead = None
    if config.lookahead_every:  # copies: the state's buffers are donated
        lookahead = jax.tree_util.tree_map(jnp.array, {"params": params, "batch_stats": batch_stats})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=optimizer.init(params),
        loss_scale=scale, lookahead=lookahead,
    )  # fmt: skip


# --------------------------------------------------------------------------- the step


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
    indices: jax.Array | None = None,
    steps_per_epoch: int | None = None,
    still: frozenset[str] | None = None,
) -> tuple[TrainState, dict]:
    """One step of `optimizer` on a batch of raw images: the trainer's and the LR range
    test's (`jaxres.lr_find`, its LR injected into the optimizer state).

    images: uint8[B, H, W, 3] (gathered, not yet augmented); labels: int32[B].
    Returns the new state and float32 scalars {loss (before the update), accuracy, finite}.
    With fp16, a step whose gradients are not finite leaves params, optimizer state
    and BatchNorm statistics as they were, and backs the loss scale off.
    `alternating_flip` needs the images' training-set `indices` (int[B]) and, like
    `lookahead_every`, the run's `steps_per_epoch` (the epoch and the total step count).
    `still`: the parameter groups that take no gradient (`optim.still_groups`; default
    those of epoch 0, i.e. the frozen whitening kernel); the updates are the same either way.
    """
    flips = None
    if config.flip and config.alternating_flip:
        if indices is None or steps_per_epoch is None:
            raise ValueError("alternating_flip needs the batch's indices and steps_per_epoch")
        flip_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), ALTERNATING_FLIP_STREAM)
        flips = augment.alternating_flips(flip_key, indices, state.step // steps_per_epoch)
    images = augment.augment_batch(
        key, images, config.crop_padding, config.flip, config.cutout_size, config.crop_padding_mode, flips
    )
    targets = labels
    if config.mix != "none":  # soft labels mixed by area (RICAP, CutMix) or weight (mixup)
        images, targets = augment.mix_batch(
            jax.random.fold_in(key, 1), images, jax.nn.one_hot(labels, model.num_classes), config.mix, config.mix_alpha
        )
    inputs = augment.normalize(images, dtype=jnp.promote_types(model.dtype, jnp.float32))
    if batch_sharding is not None:
        inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)
    scale = state.loss_scale.scale

    still = optim.still_groups(config, 0) if still is None else still

    def scaled_loss(params):
        params = optim.stop_gradients(params, still)
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, inputs, train=True, mutable=["batch_stats"]
        )
        loss = optim.smoothed_cross_entropy(logits, targets, config.label_smoothing).mean()
        return loss * scale, (loss, logits, updates.get("batch_stats", state.batch_stats))

    grads, (loss, logits, batch_stats) = jax.grad(scaled_loss, has_aux=True)(state.params)
    grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state, batch_stats=batch_stats
    )
    finite = precision.all_finite(grads) & jnp.isfinite(loss)

    if config.precision == "fp16":
        kept = precision.select_tree(
            finite, (new_state.params, new_state.opt_state, new_state.batch_stats),
            (state.params, state.opt_state, state.batch_stats),
        )  # fmt: skip
        loss_scale = precision.update_loss_scale(
            state.loss_scale, finite, growth_interval=config.loss_scale_growth_interval
        )
        new_state = new_state.replace(params=kept[0], opt_state=kept[1], batch_stats=kept[2], loss_scale=loss_scale)

    if config.lookahead_every:
        if steps_per_epoch is None:
            raise ValueError("lookahead_every needs steps_per_epoch")
        lookahead, current = optim.lookahead_update(
            new_state.step, config.total_steps(steps_per_epoch), config.lookahead_every, config.lookahead_decay,
            state.lookahead, {"params": new_state.params, "batch_stats": new_state.batch_stats},
        )  # fmt: skip
        new_state = new_state.replace(params=current["params"], batch_stats=current["batch_stats"], lookahead=lookahead)
    # with mixing, a prediction is right when it names the label with the largest share
    reference = labels if config.mix == "none" else jnp.argmax(targets, -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == reference)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}


def make_train_epoch(
    model,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    steps_per_epoch: int,
    progress: Callable[[Any], None] | None = None,
    steps: int | None = None,
    loop: str | None = None,
    still: frozenset[str] | None = None,
) -> loops.EpochProgram:
    """`train_epoch(state, images, labels, key) -> (state, metrics)`, compiled.

    images: uint8[N, H, W, 3] and labels: int32[N] (replicated on the mesh). Each epoch
    shuffles with `key`, drops the last partial batch, and runs `train_step` over
    `steps` batches (default `steps_per_epoch`, the run's full epoch; fewer for the last,
    fractional, epoch), gathered and augmented on the device. metrics: {loss,
    accuracy (means over steps), loss_scale, skipped_steps, first_nonfinite_step (-1 if
    none)}. `progress`, if given, is called on the host with the step index after each
    step (a `jax.debug.callback`). The state buffers are donated.

    `loop`: "scan" or "steps" (`jaxres.loops`), default `loops.choose_loop(config.epoch_loop,
    model)`; the program's `.loop` says which it is. `still`: see `train_step` (`train_epochs`
    passes each epoch's `optim.still_groups`, so the epochs after the whitening bias's freeze
    are a program without its backward pass).
    """
    batch_sharding = parallel.batch_sharding(mesh)
    step = functools.partial(
        train_step, model=model, optimizer=optimizer, config=config, batch_sharding=batch_sharding,
        steps_per_epoch=steps_per_epoch, still=still,
    )  # fmt: skip
    steps = steps_per_epoch if steps is None else steps

    def prepare(images, labels, key):  # xs: (step index, batch indices); context: the augmentation key
        permutation_key, augment_key = jax.random.split(key)
        order = jax.random.permutation(permutation_key, images.shape[0])
        batches = order[: steps * config.batch_size].reshape(steps, config.batch_size)
        return (jnp.arange(steps), batches), augment_key

    def body(state, x, augment_key, images, labels, key):
        step_index, batch_indices = x
        batch_indices = jax.lax.with_sharding_constraint(batch_indices, batch_sharding)
        step_key = jax.random.fold_in(augment_key, step_index)
        state, metrics = step(state, images[batch_indices], labels[batch_indices], step_key, indices=batch_indices)
        if progress is not None:
            jax.debug.callback(progress, step_index)
        return state, metrics

    def finish(state, per_step, augment_key, images, labels, key):
        nonfinite = ~per_step["finite"]
        return state, {
            "loss": per_step["loss"].mean(),
            "accuracy": per_step["accuracy"].mean(),
            "loss_scale": state.loss_scale.scale,
            "skipped_steps": nonfinite.sum(),
            "first_nonfinite_step": jnp.where(nonfinite.any(), jnp.argmax(nonfinite), -1),
        }

    loop = loops.choose_loop(config.epoch_loop, model) if loop is None else loop
    return loops.epoch_program(loop, prepare, body, finish, out_shardings=parallel.replicated(mesh))


# --------------------------------------------------------------------------- epochs


@dataclasses.dataclass
class RunSetup:
    """What `train_epochs` needs, built once per run by `prepare_run` (arrays on the mesh)."""

    config: TrainConfig
    backend: backends.ConvBackend  # `config.conv_backend` and `conv_algorithm` resolved (`backends.for_config`)
    model: Any  # built with that backend's convolutions
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    mesh: Mesh
    loop: str  # "scan" or "steps": how every epoch and evaluation of the run loops (`loops.choose_loop`)
    train_images: jax.Array  # uint8[N, H, W, 3], the training subset
    train_labels: jax.Array  # int32[N]
    test_images: jax.Array
    test_labels: jax.Array
    keys: RunKeys
    info: dict  # dataset.json's contents (`rundir.dataset_info`)
    evaluate_test: Callable  # the per-epoch evaluation, `evaluate.make_evaluate` (variables) -> {loss, accuracy, predictions}

    def test_evaluation(self, state: TrainState) -> dict:
        """The per-epoch evaluation of `state` on the test split, on the host."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return jax.device_get(self.evaluate_test(variables, self.test_images, self.test_labels))


def prepare_run(config: TrainConfig, dataset: data.Dataset, mesh: Mesh | None = None) -> RunSetup:
    """The model, optimizer, schedule, epoch loop and device-resident data of the run `config`
    describes on `dataset` (its `train_subset` selected). mesh: default all devices
    (`make_mesh`). Raises JaxresError when the batch sizes do not split over the devices or
    the training set is smaller than one batch."""
    data.check_train_subset(config.train_subset, dataset.train.labels.shape[0])
    train_indices = data.select_train_subset(dataset.train.labels, config.train_subset, config.seed)
    mesh = parallel.make_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    if config.batch_size % devices or config.eval_batch_size % devices:
        raise JaxresError(
            f"batch_size ({config.batch_size}) and eval_batch_size ({config.eval_batch_size}) must be "
            f"multiples of the device count ({devices})"
        )
    steps_per_epoch = len(train_indices) // config.batch_size
    if steps_per_epoch == 0:
        raise JaxresError(f"the training set has {len(train_indices)} images, fewer than one batch of {config.batch_size}")
    optimizer, schedule = optim.make_optimizer(config, steps_per_epoch)
    backend = backends.for_config(config)  # once, before any model is built
    model = backends.model_from_config(config, len(dataset.class_names), backend)
    models.check_image_size(model, dataset.train.images.shape[1:])
    loop = loops.choose_loop(config.epoch_loop, model, dataset.train.images.shape[1:])
    return RunSetup(
        config=config, backend=backend, model=model, optimizer=optimizer, schedule=schedule,
        steps_per_epoch=steps_per_epoch, mesh=mesh, loop=loop,
        train_images=parallel.replicate(mesh, dataset.train.images[train_indices]),
        train_labels=parallel.replicate(mesh, dataset.train.labels[train_indices].astype(np.int32)),
        test_images=parallel.replicate(mesh, dataset.test.images),
        test_labels=parallel.replicate(mesh, dataset.test.labels.astype(np.int32)),
        keys=run_keys(config.seed), info=rundir.dataset_info(dataset, len(train_indices)),
        evaluate_test=evaluate.make_evaluate(model, config, mesh, loop=loop),
    )  # fmt: skip


@dataclasses.dataclass
class EpochResult:
    """One epoch of `train_epochs`: the state after it and what it measured (on the host)."""

    epoch: int  # counted from 1
    state: TrainState  # on the mesh
    train: dict  # the epoch's summary, see `make_train_epoch`
    test: dict  # {loss, accuracy, predictions: int32[N]}, see `evaluate.make_evaluate`
    seconds: float  # the training epoch's wall time less its compilation
    compile_seconds: float  # tracing and compiling the training epoch (its first call)
    evaluation_seconds: float  # the evaluation's wall time, compilation included
    evaluation_compile_seconds: float  # of which compiling the evaluation (its first call)
    epoch_loop: str = ""  # how the epoch ran: "scan" or "steps" (`RunSetup.loop`)
    steps: int = 0  # optimizer steps in the epoch (0: a full epoch; fewer in a fractional last one)


def train_epochs(
    setup: RunSetup, state: TrainState, start_epoch: int, stop_epoch: int, progress: EpochProgress | None = None
) -> Iterator[EpochResult]:
    """Train epochs start_epoch+1 .. stop_epoch from `state` (replicated on the mesh), each
    followed by an evaluation on the test split; yields each epoch's `EpochResult`.
    The state passed in is donated (its buffers reused)."""
    # (steps, still groups) -> train_epoch: a fractional last epoch is a shorter program, and
    # the epochs after the whitening bias's freeze one without its gradient
    programs = {}
    for epoch in range(start_epoch, stop_epoch):
        steps = setup.config.steps_in_epoch(epoch, setup.steps_per_epoch)
        still = optim.still_groups(setup.config, epoch)
        if (steps, still) not in programs:
            programs[steps, still] = make_train_epoch(
                setup.model, setup.optimizer, setup.config, setup.mesh, setup.steps_per_epoch,
                progress=progress.update if progress else None, steps=steps, loop=setup.loop, still=still,
            )  # fmt: skip
        if progress is not None:
            progress.start(epoch + 1, steps)
        started = time.perf_counter()
        with CompileClock() as compile_clock:
            state, metrics = programs[steps, still](
                state, setup.train_images, setup.train_labels, epoch_key(setup.keys.data, epoch)
            )
            metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - started - compile_clock.seconds
        if progress is not None:
            progress.close()
        evaluation_started = time.perf_counter()
        with CompileClock() as evaluation_clock:
            evaluation = setup.test_evaluation(state)
        yield EpochResult(
            epoch=epoch + 1, state=state, train=metrics, test=evaluation, seconds=seconds,
            compile_seconds=compile_clock.seconds, evaluation_seconds=time.perf_counter() - evaluation_started,
            evaluation_compile_seconds=evaluation_clock.seconds, epoch_loop=setup.loop, steps=steps,
        )  # fmt: skip


def final_tta_evaluation(setup: RunSetup, state: TrainState) -> dict:
    """The final model on the test split with `config.final_tta`: {final_tta,
    final_tta_accuracy, final_tta_loss, final_tta_seconds (compilation included)}."""
    started = time.perf_counter()
    evaluate_test = evaluate.make_evaluate(setup.model, setup.config, setup.mesh, tta=setup.config.final_tta, loop=setup.loop)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    evaluation = jax.device_get(evaluate_test(variables, setup.test_images, setup.test_labels))
    return {
        "final_tta": setup.config.final_tta,
        "final_tta_accuracy": float(evaluation["accuracy"]),
        "final_tta_loss": float(evaluation["loss"]),
        "final_tta_seconds": time.perf_counter() - started,
    }


def restore_or_initialise(setup: RunSetup, dataset: data.Dataset, saved) -> tuple[TrainState, list[dict]]:
    """The run's state at its start, replicated on the mesh, and the metrics rows so far: fresh
    (`saved` None), or the checkpoint `saved` = `rundir.read_resumable(...)` restored into
    it after checking that the data and its step fit this run."""
    config = setup.config
    variables = models.init_variables(setup.model, setup.keys.init, dataset.train.images.shape[1:])
    if config.model == "airbench94":  # its first layer is computed from the training images
        variables = airbench.init_whitening(variables, setup.train_images)
    state, history = init_train_state(config, setup.optimizer, variables), []
    if saved is not None:
        workdir = Path(config.workdir)
        if (workdir / rundir.DATA_INFO_NAME).is_file():
            rundir.check_data_fits_run(workdir, dataset, train_images=setup.info["train_images"])
        state, history = rundir.fit_state_dict(rundir.checkpoint_path(workdir), saved[0], state), saved[1]
        if int(state.step) != min(len(history) * setup.steps_per_epoch, config.total_steps(setup.steps_per_epoch)):
            raise JaxresError(
                f"cannot resume {workdir}: its checkpoint is at step {int(state.step)}, not at the end of its "
                f"epoch {len(history)} of {setup.steps_per_epoch} steps (did the training set change?)"
            )
    return parallel.replicate_tree(setup.mesh, state), history


# --------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` returns: the final state (on the mesh), every epoch's
    metrics row (metrics.jsonl's), the run's config and its `RunSetup`."""

    state: TrainState
    history: list[dict]
    config: TrainConfig
    setup: RunSetup


def describe_run(setup: RunSetup, dataset: data.Dataset) -> str:
    """The line that opens a run's log: model, precision, data, steps, devices, loop."""
    config, info = setup.config, setup.info
    return (
        f"training {config.model} (width {config.width}, {config.precision}) on {dataset.source}: "
        f"{info['train_images']} train / {info['test_images']} test images, {setup.steps_per_epoch} steps of "
        f"{config.batch_size} per epoch, {setup.mesh.devices.size} device(s), {setup.backend.name} convolutions, "
        f"epoch loop {setup.loop}"
    )


@rundir.claims_workdir  # checked before any data is loaded, then one run writes it at a time
def train_and_evaluate(
    config: TrainConfig, *, resume: bool = False, dataset: data.Dataset | None = None, progress: bool | None = None,
    log: Callable[[str], None] = print, write_plots: bool = True, mesh: Mesh | None = None,
    tune: Callable[[TrainConfig, data.Dataset], TrainConfig] | None = None, on_epoch: Callable[[dict], bool] | None = None,
) -> RunResult:
    """Run (or resume) the training `config` describes, writing config.json, dataset.json,
    metrics.jsonl, the checkpoint after every epoch and the plots to its workdir.

    resume: continue from the workdir's checkpoint, bit-exactly as if never stopped (the
      saved recipe must equal `config`'s; run options, `config.RUN_OPTIONS`, may change).
    dataset: a `jaxres.data.Dataset` instead of loading `config.data`. progress: a bar per
      epoch (default: when stderr is a terminal). log: where the table lines go.
    write_plots: curves.png, lr_schedule.png, misclassified.png at the end. mesh: the devices
      (default all, `parallel.make_mesh()`). tune: `tune(config, dataset) -> config`, once the
      data is loaded, before anything is built (`--peak-lr auto` runs the LR range test so).
    on_epoch: called with each epoch's metrics row after its checkpoint; True ends the run
      there (early stopping; it can be resumed).

    Returns a `RunResult`. Raises JaxresError for an unusable workdir, data or config (named
    in the message), `monitoring.NonFiniteLossError` for a non-finite loss (the last good
    checkpoint stays intact).
    """
    is_main, workdir = jax.process_index() == 0, Path(config.workdir)
    saved = rundir.read_resumable(workdir, config) if resume else None  # verified before any data is loaded
    progress = sys.stderr.isatty() if progress is None else progress
    if dataset is None:
        dataset = data.load_dataset(config.data, cache_dir=config.cache_dir, progress=progress and is_main)
    config = config if tune is None else tune(config, dataset)
    setup = prepare_run(config, dataset, mesh)
    state, history = restore_or_initialise(setup, dataset, saved)
    if saved is not None:
        log(f"resumed {workdir} at epoch {len(history)}")
    if is_main:
        rundir.start_run_files(workdir, config, setup.info, history)
    log(describe_run(setup, dataset))
    log(TABLE_HEADER)
    bar, predictions = EpochProgress(setup.steps_per_epoch) if progress and is_main else None, None
    for result in train_epochs(setup, state, len(history), config.epoch_count, bar):
        state, predictions = result.state, result.test["predictions"]
        monitoring.check_epoch_is_finite(config, workdir, result.epoch, result.train, result.test, result.steps)
        history.append(monitoring.metrics_row(result, setup.schedule, setup.steps_per_epoch, config.batch_size))
        log(format_row(history[-1]))
        if is_main:
            rundir.save_epoch(workdir, jax.device_get(state), history)
        if on_epoch is not None and on_epoch(history[-1]):
            break
    if config.final_tta != "none" and len(history) == config.epoch_count and "final_tta_accuracy" not in history[-1]:
        history[-1].update(final_tta_evaluation(setup, state))
        log(f"final model with TTA {config.final_tta}: test accuracy {100 * history[-1]['final_tta_accuracy']:.2f}%")
        if is_main:
            rundir.save_epoch(workdir, jax.device_get(state), history)
    if is_main and write_plots and history:
        if predictions is None:  # resumed at the end: the misclassified images need one evaluation
            predictions = setup.test_evaluation(state)["predictions"]
        plots.save_run_plots(workdir, config, history, setup.schedule, setup.steps_per_epoch, dataset, predictions)
    return RunResult(state=state, history=history, config=config, setup=setup)


if __name__ == "__main__":  # `python -m jaxres.train`: the command line lives in jaxres.cli
    from jaxres import cli

    sys.exit(cli.train_main())
