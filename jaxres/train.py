"""Training: the state, the jitted train step, the epoch, and `train_and_evaluate`.

A batch walks straight down: data (`jaxres.data`) -> augment (`jaxres.augment`) -> model
(`jaxres.models`) -> loss and optimizer (`jaxres.optim`) -> metrics -> the run directory
(`jaxres.rundir`). This module is the one place that wires them:

1. data     `load_dataset` -> uint8 arrays on the host, put once on the device(s)
            (`prepare_run`).
2. state    `init_train_state`: params, batch_stats, optimizer state, loss scale.
3. epoch    `make_train_epoch`: `train_step` over shuffled batches that are gathered
            and augmented on the device; one compiled `lax.scan` program per epoch, or
            on CPU, while a step has an XLA convolution, a host loop of the jitted step
            (`parallel.resolve_epoch_loop`).
            The host sees only a few scalars per epoch.
4. eval     `jaxres.evaluate.make_evaluate`: the test set, looped the same way.
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
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxres import airbench, augment, data, evaluate, models, optim, parallel, plots, precision, rundir
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError
from jaxres import monitoring
from jaxres.monitoring import TABLE_HEADER, CompileClock, EpochProgress, format_row


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `step` counts optimizer steps taken (skipped fp16 steps too).
    `lookahead`: with `lookahead_every`, the moving average {params, batch_stats} of
    `jaxres.optim.lookahead_update`; else None."""

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
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        loss_scale=scale,
        lookahead=lookahead,
    )


# --------------------------------------------------------------------------- steps

# The key of `alternating_flip`'s per-image coins: fold_in(PRNGKey(seed), this), fixed for the run.
ALTERNATING_FLIP_STREAM = 0x666C6970


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
) -> tuple[TrainState, dict]:
    """One optimizer step on a batch of raw images.

    images: uint8[B, H, W, 3] (gathered, not yet augmented); labels: int32[B].
    Returns the new state and float32 scalars {loss, accuracy, finite}.
    With fp16, a step whose gradients are not finite leaves params, optimizer state
    and BatchNorm statistics as they were, and backs the loss scale off.
    `alternating_flip` needs the images' training-set `indices` (int[B]) and, like
    `lookahead_every`, the run's `steps_per_epoch` (the epoch and the total step count).
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

    def scaled_loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, inputs, train=True, mutable=["batch_stats"]
        )
        loss = optim.smoothed_cross_entropy(logits, targets, config.label_smoothing).mean()
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

    lookahead = state.lookahead
    if config.lookahead_every:
        if steps_per_epoch is None:
            raise ValueError("lookahead_every needs steps_per_epoch")
        lookahead, current = optim.lookahead_update(
            state.step + 1, config.total_steps(steps_per_epoch), config.lookahead_every, config.lookahead_decay,
            lookahead, {"params": params, "batch_stats": batch_stats},
        )  # fmt: skip
        params, batch_stats = current["params"], current["batch_stats"]
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, loss_scale, lookahead)
    # with mixing, a prediction is right when it names the label with the largest share
    reference = labels if config.mix == "none" else jnp.argmax(targets, -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == reference)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}


def make_train_epoch(
    model,
    optimizer,
    config: TrainConfig,
    mesh: Mesh,
    steps_per_epoch: int,
    progress: Callable[[Any], None] | None = None,
    steps: int | None = None,
):
    """`train_epoch(state, images, labels, key) -> (state, metrics)`, compiled.

    images: uint8[N, H, W, 3] and labels: int32[N] (replicated on the mesh). Each epoch
    shuffles with `key`, drops the last partial batch, and runs `train_step` over
    `steps` batches (default `steps_per_epoch`, the run's full epoch; fewer for the last,
    fractional, epoch), gathered and augmented on the device. metrics: {loss,
    accuracy (means over steps), loss_scale, skipped_steps, first_nonfinite_step (-1 if
    none)}. `progress`, if given, is called on the host with the step index after each
    step (a `jax.debug.callback`). The state buffers are donated.

    With `config.epoch_loop` "scan" the epoch is one program (a `lax.scan` over the
    steps); with "steps" it is a host loop over one jitted step; both compute the same.
    "auto" is decided on the first call (`parallel.resolve_epoch_loop`, which traces one
    step); the returned `parallel.LoopChoice` then says which in `.loop`.
    """
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    step_fn = functools.partial(
        train_step, model=model, optimizer=optimizer, config=config, batch_sharding=batch_sharding,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    steps = steps_per_epoch if steps is None else steps

    def shuffled_batches(key, num_images):
        permutation_key, augment_key = jax.random.split(key)
        order = jax.random.permutation(permutation_key, num_images)
        batches = order[: steps * config.batch_size].reshape(steps, config.batch_size)
        return batches, augment_key

    def one_step(state, images, labels, batch_indices, step_index, augment_key):
        batch_indices = jax.lax.with_sharding_constraint(batch_indices, batch_sharding)
        step_key = jax.random.fold_in(augment_key, step_index)
        state, metrics = step_fn(state, images[batch_indices], labels[batch_indices], step_key, indices=batch_indices)
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

    def scanned():
        def scanned_epoch(state, images, labels, key):
            batches, augment_key = shuffled_batches(key, images.shape[0])

            def body(state, inputs):
                step_index, batch_indices = inputs
                return one_step(state, images, labels, batch_indices, step_index, augment_key)

            state, per_step = jax.lax.scan(body, state, (jnp.arange(steps), batches))
            return state, summarize(state, per_step)

        return jax.jit(scanned_epoch, donate_argnums=(0,), out_shardings=replicated)

    def stepped():
        shuffle = jax.jit(shuffled_batches, static_argnums=1, out_shardings=replicated)
        step = jax.jit(one_step, donate_argnums=(0,), out_shardings=replicated)
        finish = jax.jit(
            lambda state, per_step: summarize(state, jax.tree_util.tree_map(lambda *x: jnp.stack(x), *per_step)),
            out_shardings=replicated,
        )

        def stepped_epoch(state, images, labels, key):
            batches, augment_key = shuffle(key, images.shape[0])
            per_step = []
            for step_index in range(steps):
                state, metrics = step(state, images, labels, batches[step_index], step_index, augment_key)
                per_step.append(metrics)
            return state, finish(state, per_step)

        return stepped_epoch

    def trace(state, images, labels, key):
        batch_indices = jnp.zeros(config.batch_size, jnp.int32)
        return jax.make_jaxpr(one_step)(state, images, labels, batch_indices, 0, key)

    return parallel.LoopChoice(config.epoch_loop, lambda loop: scanned() if loop == "scan" else stepped(), trace)


# --------------------------------------------------------------------------- epochs


@dataclasses.dataclass
class RunSetup:
    """What `train_epochs` needs, built once per run by `prepare_run` (arrays on the mesh)."""

    config: TrainConfig
    model: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    mesh: Mesh
    train_images: jax.Array  # uint8[N, H, W, 3], the training subset
    train_labels: jax.Array  # int32[N]
    test_images: jax.Array
    test_labels: jax.Array
    init_key: jax.Array  # the model's initialisation
    data_key: jax.Array  # shuffles and augmentations: epoch e uses fold_in(data_key, e)


def prepare_run(config: TrainConfig, dataset: data.Dataset, mesh: Mesh | None = None) -> RunSetup:
    """The model, optimizer, schedule and device-resident data of the run `config` describes
    on `dataset` (its `train_subset` selected). mesh: default all devices (`make_mesh`).
    Raises JaxresError when the batch sizes do not split over the devices or the training
    set is smaller than one batch."""
    data.check_train_subset(config.train_subset, dataset.train.labels.shape[0])
    train_indices = data.select_train_subset(dataset.train.labels, config.train_subset, config.seed)
    train_images = dataset.train.images[train_indices]
    mesh = parallel.make_mesh() if mesh is None else mesh
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
    optimizer, schedule = optim.make_optimizer(config, steps_per_epoch)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return RunSetup(
        config=config,
        model=models.from_config(config, len(dataset.class_names)),
        optimizer=optimizer,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
        train_images=parallel.replicate(mesh, train_images),
        train_labels=parallel.replicate(mesh, dataset.train.labels[train_indices].astype(np.int32)),
        test_images=parallel.replicate(mesh, dataset.test.images),
        test_labels=parallel.replicate(mesh, dataset.test.labels.astype(np.int32)),
        init_key=init_key,
        data_key=data_key,
    )


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
    epoch_loop: str = ""  # how the epoch ran: "scan" or "steps" (`parallel.resolve_epoch_loop`)
    steps: int = 0  # optimizer steps in the epoch (0: a full epoch; fewer in a fractional last one)


def train_epochs(
    setup: RunSetup, state: TrainState, start_epoch: int, stop_epoch: int, progress: EpochProgress | None = None
) -> Iterator[EpochResult]:
    """Train epochs start_epoch+1 .. stop_epoch from `state` (replicated on the mesh), each
    followed by an evaluation on the test split; yields each epoch's `EpochResult`.
    The state passed in is donated (its buffers reused)."""
    programs = {}  # steps -> train_epoch: a fractional last epoch is a shorter program

    def train_epoch_of(steps):
        if steps not in programs:
            programs[steps] = make_train_epoch(
                setup.model, setup.optimizer, setup.config, setup.mesh, setup.steps_per_epoch,
                progress=progress.update if progress else None, steps=steps,
            )  # fmt: skip
        return programs[steps]

    evaluate_test = evaluate.make_evaluate(setup.model, setup.config, setup.mesh)
    for epoch in range(start_epoch, stop_epoch):
        steps = setup.config.steps_in_epoch(epoch, setup.steps_per_epoch)
        train_epoch = train_epoch_of(steps)
        if progress is not None:
            progress.start(epoch + 1, steps)
        started = time.perf_counter()
        with CompileClock() as compile_clock:
            state, metrics = train_epoch(
                state, setup.train_images, setup.train_labels, jax.random.fold_in(setup.data_key, epoch)
            )
            metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - started - compile_clock.seconds
        if progress is not None:
            progress.close()
        evaluation_started = time.perf_counter()
        with CompileClock() as evaluation_clock:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            evaluation = jax.device_get(evaluate_test(variables, setup.test_images, setup.test_labels))
        yield EpochResult(
            epoch + 1, state, metrics, evaluation, seconds, compile_clock.seconds,
            time.perf_counter() - evaluation_started, evaluation_clock.seconds, train_epoch.loop, steps,
        )  # fmt: skip


def final_tta_evaluation(setup: RunSetup, state: TrainState) -> dict:
    """The final model on the test split with `config.final_tta`: {final_tta,
    final_tta_accuracy, final_tta_loss, final_tta_seconds (compilation included)}."""
    started = time.perf_counter()
    evaluate_test = evaluate.make_evaluate(setup.model, setup.config, setup.mesh, tta=setup.config.final_tta)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    evaluation = jax.device_get(evaluate_test(variables, setup.test_images, setup.test_labels))
    return {
        "final_tta": setup.config.final_tta,
        "final_tta_accuracy": float(evaluation["accuracy"]),
        "final_tta_loss": float(evaluation["loss"]),
        "final_tta_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    config: TrainConfig


@rundir.holds_workdir_lock  # one run writes a workdir at a time: a second is refused, naming the first
def train_and_evaluate(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset: data.Dataset | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
    write_plots: bool = True,
    mesh: Mesh | None = None,
) -> RunResult:
    """Run (or resume) the training described by `config`; write everything to its workdir.

    Args:
      config: the run (see `jaxres.config.TrainConfig`); its workdir receives config.json,
        dataset.json, metrics.jsonl, the checkpoint after every epoch, and the plots.
      resume: continue from the workdir's checkpoint, bit-exactly as if never stopped. The
        saved recipe must equal `config`'s (run options such as the data path, cache folder
        or epoch loop may change; see `jaxres.config.RUN_OPTIONS`), and the data must have
        the saved class names, image shape and counts.
      dataset: a `jaxres.data.Dataset` to use instead of loading `config.data`.
      progress: show a progress bar per epoch; default: when stderr is a terminal.
      log: where the table lines go (`print`; a no-op on processes other than 0).
      stop_after_epoch: end the run early after this many epochs (to simulate an interruption).
      write_plots: write curves.png, lr_schedule.png and misclassified.png at the end.
      mesh: the devices to use (default: all of them, `parallel.make_mesh()`).

    Returns:
      A `RunResult`: the final state (on the mesh), every epoch's metrics row, the config.

    Raises:
      JaxresError: an unusable workdir, data or config (named in the message).
      monitoring.NonFiniteLossError: a non-finite loss; the last good checkpoint stays intact.
    """
    is_main = jax.process_index() == 0
    progress = sys.stderr.isatty() if progress is None else progress
    workdir = Path(config.workdir)
    rundir.check_workdir(workdir, resume, writable=is_main)
    if resume:
        changed = rundir.load_config(workdir).recipe_differences(config)
        if changed:
            raise JaxresError(
                f"cannot resume {workdir}: its config.json differs in {', '.join(changed)}; "
                "resume with the same recipe (or omit those flags: --resume alone reuses the saved ones)"
            )
        saved_state, history = rundir.read_checkpoint(workdir)  # verified before any data is loaded
    else:
        saved_state, history = None, []

    # 1. data, model, optimizer
    if dataset is None:
        dataset = data.load_dataset(config.data, cache_dir=config.cache_dir, progress=progress and is_main)
    setup = prepare_run(config, dataset, mesh)
    info = rundir.dataset_info(dataset, setup.train_images.shape[0])

    # 2. state
    variables = models.init_variables(setup.model, setup.init_key, dataset.train.images.shape[1:])
    if config.model == "airbench94":  # its first layer is computed from the training images
        variables = airbench.init_whitening(variables, setup.train_images)
    state = init_train_state(config, setup.optimizer, variables)
    if resume:
        if (workdir / rundir.DATA_INFO_NAME).is_file():
            rundir.check_data_fits_run(workdir, dataset, train_images=info["train_images"])
        state = rundir.fit_state_dict(rundir.checkpoint_path(workdir), saved_state, state)
        if int(state.step) != min(len(history) * setup.steps_per_epoch, config.total_steps(setup.steps_per_epoch)):
            raise JaxresError(
                f"cannot resume {workdir}: its checkpoint is at step {int(state.step)}, not at the end of its "
                f"epoch {len(history)} of {setup.steps_per_epoch} steps (did the training set change?)"
            )
        log(f"resumed {workdir} at epoch {len(history)}")
    state = parallel.replicate_tree(setup.mesh, state)
    if is_main:
        rundir.start_run_files(workdir, config, info, history)

    # 3-5. epochs: train, evaluate, commit the checkpoint with the epoch's row
    log(
        f"training {config.model} (width {config.width}, {config.precision}) on {dataset.source}: "
        f"{info['train_images']} train / {info['test_images']} test images, "
        f"{setup.steps_per_epoch} steps of {config.batch_size} per epoch, {setup.mesh.devices.size} device(s)"
    )
    log(TABLE_HEADER)
    stop_epoch = config.epoch_count if stop_after_epoch is None else min(config.epoch_count, stop_after_epoch)
    bar = EpochProgress(setup.steps_per_epoch) if progress and is_main else None
    predictions = None
    for result in train_epochs(setup, state, len(history), stop_epoch, bar):
        state = result.state
        monitoring.check_epoch_is_finite(config, workdir, result.epoch, result.train, result.test, result.steps or setup.steps_per_epoch)
        predictions = result.test["predictions"]
        history.append(monitoring.metrics_row(result, setup.schedule, setup.steps_per_epoch, config.batch_size))
        log(format_row(history[-1]))
        if is_main:
            rundir.save_epoch(workdir, jax.device_get(state), history)

    if history and config.final_tta != "none" and len(history) == config.epoch_count and "final_tta_accuracy" not in history[-1]:
        history[-1].update(final_tta_evaluation(setup, state))
        log(f"final model with TTA {config.final_tta}: test accuracy {100 * history[-1]['final_tta_accuracy']:.2f}%")
        if is_main:
            rundir.save_epoch(workdir, jax.device_get(state), history)

    if is_main and write_plots and history:
        if predictions is None:  # resumed at the end: evaluate once for the misclassified images
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            evaluate_test = evaluate.make_evaluate(setup.model, config, setup.mesh)
            predictions = jax.device_get(evaluate_test(variables, setup.test_images, setup.test_labels))["predictions"]
        plots.save_run_plots(workdir, config, history, setup.schedule, setup.steps_per_epoch, dataset, predictions)
    return RunResult(state=state, history=history, config=config)


if __name__ == "__main__":  # `python -m jaxres.train`: the command line lives in jaxres.cli
    from jaxres import cli

    sys.exit(cli.train_main())
