"""The jaxres side of a benchmark worker (imported by `benchmarks.worker` only; no torch here).

Everything goes through the library's own code path: `jaxres.train.build_model`,
`make_optimizer`, `make_mesh`, `replicate`, `make_train_epoch` (a host loop of the jitted
step on CPU, one `lax.scan` program on a GPU: `epoch_loop="auto"`), `make_evaluate`,
`jaxres.gradcam.gradcam` and `jaxres.convert.torch_to_flax` for the shared weights.

The training state is `jaxres.train.TrainState` built from the converted weights exactly
as `init_train_state` builds it from fresh ones (step 0, `optimizer.init(params)`, the
precision's loss scale): `init_train_state` itself would first compile a random
initialisation that the shared weights replace (about 20 s on a 2-core CPU).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxres import augment, convert, gradcam, precision, train
from jaxres.config import TrainConfig


def configure_threads(threads: int) -> dict:
    return {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "jax_backend": jax.default_backend()}


def check_backend(args) -> None:
    backend = jax.default_backend()
    if args.device == "gpu" and backend != "gpu":
        raise RuntimeError(f"--device gpu, but jax runs on {backend} (is a CUDA jaxlib plugin installed?)")
    if args.device == "cpu" and backend != "cpu":
        raise RuntimeError(f"--device cpu, but jax runs on {backend}; set JAX_PLATFORMS=cpu")


def load_weights(path: str) -> dict:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def config_for(args, **overrides) -> TrainConfig:
    values = dict(
        width=args.width,
        norm=args.norm,
        batch_size=args.batch,
        precision=args.precision,
        epoch_loop=args.epoch_loop,
        eval_batch_size=args.eval_batch,
        seed=args.seed,
    )
    values.update(overrides)
    return TrainConfig(**values)


def state_from_weights(config: TrainConfig, optimizer, variables: dict) -> train.TrainState:
    """What `train.init_train_state` returns, with the given variables instead of a random init."""
    params = variables["params"]
    scale = (
        precision.init_loss_scale(config.initial_loss_scale) if config.precision == "fp16" else precision.no_loss_scale()
    )
    return train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        loss_scale=scale,
    )


def device_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or jax.default_backend() == "cpu":
        return {}
    return {"device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20}


def describe_common(config: TrainConfig) -> dict:
    return {
        "device_name": str(jax.local_devices()[0].device_kind),
        "precision": config.precision,
        "epoch_loop": train.resolve_epoch_loop(config.epoch_loop),
        "devices": jax.device_count(),
    }


def timed(function):
    """(result, seconds, compile seconds) of `function()`, waiting for the device."""
    with train.CompileClock() as clock:
        started = time.perf_counter()
        result = jax.block_until_ready(function())
        seconds = time.perf_counter() - started
    return result, seconds, clock.seconds


# --------------------------------------------------------------------------- repeated tasks


def shared_variables(args, model) -> dict:
    """The `--weights` npz (a PyTorch state_dict) as `model`'s Flax variables."""
    return convert.torch_to_flax(load_weights(args.weights), model)


def timed_measurement(function, images: int) -> tuple:
    """(`function()`'s result, the 'measurement' message of that call: {images, seconds, compile_seconds})."""
    result, seconds, compile_seconds = timed(function)
    return result, {"images": images, "seconds": seconds, "compile_seconds": compile_seconds}


class Session:
    """What every repeated task's session shares: the backend check, the model of
    `config_for(args, **config_overrides)` on this process's mesh, the 'ready' message's
    description and the 'finished' message's device memory. Subclasses add `measure()`."""

    def __init__(self, args, **config_overrides):
        check_backend(args)
        self.args = args
        self.config = config_for(args, **config_overrides)
        self.mesh = train.make_mesh()
        self.model = train.build_model(self.config, num_classes=10)

    def describe(self) -> dict:
        return describe_common(self.config)

    def device_memory(self) -> dict:
        return device_memory()


class TrainSession(Session):
    """`measure()`: one `make_train_epoch` call of `args.steps` steps (shuffle, gather,
    augment, step: the real code path)."""

    def __init__(self, args, arrays):
        super().__init__(args)
        optimizer, _ = train.make_optimizer(self.config, steps_per_epoch=args.steps)
        state = state_from_weights(self.config, optimizer, shared_variables(args, self.model))
        self.state = train.replicate_tree(self.mesh, state)
        self.images = train.replicate(self.mesh, arrays["train_images"])
        self.labels = train.replicate(self.mesh, arrays["train_labels"])
        self.train_epoch = train.make_train_epoch(self.model, optimizer, self.config, self.mesh, args.steps)
        self.key = jax.random.PRNGKey(args.seed)
        self.calls = 0

    def measure(self) -> dict:
        key = jax.random.fold_in(self.key, self.calls)
        self.calls += 1

        def run():
            self.state, metrics = self.train_epoch(self.state, self.images, self.labels, key)
            return self.state, jax.device_get(metrics)

        (_, metrics), measurement = timed_measurement(run, self.args.steps * self.args.batch)
        return {**measurement, "loss": float(metrics["loss"])}


class EvalSession(Session):
    """`measure()`: `make_evaluate` over the first `eval_images` test images."""

    def __init__(self, args, arrays):
        super().__init__(args)
        self.variables = train.replicate_tree(self.mesh, shared_variables(args, self.model))
        self.images = train.replicate(self.mesh, arrays["test_images"][: args.eval_images])
        self.labels = train.replicate(self.mesh, arrays["test_labels"][: args.eval_images])
        self.evaluate = train.make_evaluate(self.model, self.config, self.mesh)

    def describe(self) -> dict:
        return {**super().describe(), "eval_batch": self.config.eval_batch_size}

    def measure(self) -> dict:
        result, measurement = timed_measurement(
            lambda: jax.device_get(self.evaluate(self.variables, self.images, self.labels)), int(self.images.shape[0])
        )
        return {**measurement, "accuracy": float(result["accuracy"])}


class GradcamSession(Session):
    """`measure()`: `jaxres.gradcam.gradcam` (layer3, predicted class) of `gradcam_images` test
    images in batches of `gradcam_batch`, the maps copied to the host (as the PyTorch side)."""

    def __init__(self, args, arrays):
        super().__init__(args, precision="fp32")
        self.variables = train.replicate_tree(self.mesh, shared_variables(args, self.model))
        images = arrays["test_images"][: args.gradcam_images]
        self.batches = [
            train.replicate(self.mesh, images[i : i + args.gradcam_batch]) for i in range(0, len(images), args.gradcam_batch)
        ]

    def describe(self) -> dict:
        return {**super().describe(), "gradcam_batch": self.args.gradcam_batch}

    def measure(self) -> dict:
        def run():
            return [np.asarray(gradcam.gradcam(self.model, self.variables, batch)) for batch in self.batches]

        _, measurement = timed_measurement(run, sum(int(b.shape[0]) for b in self.batches))
        return measurement


SESSIONS = {"train": TrainSession, "eval": EvalSession, "gradcam": GradcamSession}


def make_session(args, arrays):
    return SESSIONS[args.task](args, arrays)


# --------------------------------------------------------------------------- one-shot tasks


def parity(args, arrays) -> dict:
    """Logits (inference mode, fp32) and Grad-CAM maps of the first test images from `--weights`
    (through `jaxres.convert.torch_to_flax`), at 'highest' matmul precision (no TF32 on a GPU)."""
    check_backend(args)
    config = config_for(args, precision="fp32")
    model = train.build_model(config, num_classes=10)
    variables = shared_variables(args, model)
    images = arrays["test_images"][: args.parity_images]
    with jax.default_matmul_precision("highest"):
        apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x), train=False))
        logits = np.asarray(apply(variables, images))
        cams = np.asarray(gradcam.gradcam(model, variables, images[:8]))
    return {"logits": logits.tolist(), "cams": cams.tolist()}


def time_to_accuracy(args, arrays) -> dict:
    """The recipe for `--epochs` epochs from `--weights`: `make_train_epoch` per epoch, then
    `make_evaluate` on the whole test split; the first epoch's compilation is timed apart."""
    check_backend(args)
    config = config_for(args, epochs=args.epochs, batch_size=args.accuracy_batch, eval_batch_size=1000)
    indices = common.train_subset_indices(len(arrays["train_labels"]), args.train_subset, args.seed)
    mesh = train.make_mesh()
    train_images = train.replicate(mesh, arrays["train_images"][indices])
    train_labels = train.replicate(mesh, arrays["train_labels"][indices])
    test_images = train.replicate(mesh, arrays["test_images"])
    test_labels = train.replicate(mesh, arrays["test_labels"])
    steps_per_epoch = int(train_images.shape[0]) // config.batch_size
    model = train.build_model(config, num_classes=10)
    optimizer, _ = train.make_optimizer(config, steps_per_epoch)
    variables = convert.torch_to_flax(load_weights(args.weights), model)
    state = train.replicate_tree(mesh, state_from_weights(config, optimizer, variables))
    _, data_key = jax.random.split(jax.random.PRNGKey(config.seed))  # as train_and_evaluate
    train_epoch = train.make_train_epoch(model, optimizer, config, mesh, steps_per_epoch)
    evaluate = train.make_evaluate(model, config, mesh)

    history, reached, compile_total = [], None, 0.0
    started = time.perf_counter()
    for epoch in range(config.epochs):
        with train.CompileClock() as clock:
            epoch_start = time.perf_counter()
            state, metrics = train_epoch(state, train_images, train_labels, jax.random.fold_in(data_key, epoch))
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - epoch_start
            evaluation = jax.device_get(
                evaluate({"params": state.params, "batch_stats": state.batch_stats}, test_images, test_labels)
            )
        elapsed = time.perf_counter() - started
        compile_total += clock.seconds
        row = {
            "epoch": epoch + 1,
            "train_loss": float(metrics["loss"]),
            "train_accuracy": float(metrics["accuracy"]),
            "test_accuracy": float(evaluation["accuracy"]),
            "test_loss": float(evaluation["loss"]),
            "seconds": seconds,
            "elapsed": elapsed,
            "compile_seconds": clock.seconds,
        }
        history.append(row)
        if reached is None and args.target is not None and row["test_accuracy"] >= args.target:
            reached = elapsed
        if config.precision != "fp16" and int(metrics["first_nonfinite_step"]) >= 0:
            raise FloatingPointError(f"the jaxres training loss became non-finite at epoch {epoch + 1}")
    return {
        "history": history,
        "final_accuracy": history[-1]["test_accuracy"],
        "wall_seconds": time.perf_counter() - started,
        "compile_seconds": compile_total,
        "seconds_to_target": reached,
        **describe_common(config),
        **device_memory(),
        "train_images": int(train_images.shape[0]),
        "test_images": int(test_images.shape[0]),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
    }
