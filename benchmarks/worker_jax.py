"""The jaxres side of a benchmark worker (imported by `benchmarks.worker` only; no torch here).

Everything goes through the library's own code path: `jaxres.backends.model_from_config`,
`jaxres.optim.make_optimizer`, `jaxres.parallel`, `jaxres.train.make_train_epoch` (one
`lax.scan` program, or on CPU while XLA convolutions are left a host loop of the jitted
step: `epoch_loop="auto"`) and
`train_epochs` (time to accuracy), `jaxres.evaluate.make_evaluate`, `jaxres.gradcam.gradcam`
and `jaxres.convert.torch_to_flax` for the shared weights, from which
`jaxres.train.init_train_state` builds the training state (no random initialisation to
compile first).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jaxres import augment, backends, convert, data, evaluate, gradcam, loops, monitoring, onednn, optim, parallel, train
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
        conv_backend=args.conv_backend,
        eval_batch_size=args.eval_batch,
        seed=args.seed,
    )
    values.update(overrides)
    return TrainConfig(**values)


def device_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or jax.default_backend() == "cpu":
        return {}
    return {"device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20}


def describe_common(config: TrainConfig, epoch_loop: str | None = None) -> dict:
    """What every jax row records; epoch_loop: the loop an epoch or evaluation ran in (its
    `loops.EpochProgram.loop`), by default what `config.epoch_loop` resolves to untraced."""
    backend = backends.for_config(config)
    record = {
        "device_name": str(jax.local_devices()[0].device_kind),
        "precision": config.precision,
        "epoch_loop": epoch_loop or loops.choose_loop(config.epoch_loop),
        "conv_backend": backend.name,
        "devices": jax.device_count(),
    }
    if backend.name == "onednn":  # which convolutions oneDNN took on this CPU (None: every float32 one)
        record["onednn_max_channel_product"] = onednn.default().max_channel_product
        record["onednn_native_bf16"] = onednn.default().native_bf16  # whether it took the bf16 ones
    return record


def timed(function):
    """(result, seconds, compile seconds) of `function()`, waiting for the device."""
    with monitoring.CompileClock() as clock:
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
        self.mesh = parallel.make_mesh()
        self.model = backends.model_from_config(self.config, num_classes=10)

    def describe(self) -> dict:
        return describe_common(self.config)

    def device_memory(self) -> dict:
        return device_memory()


class TrainSession(Session):
    """`measure()`: one `make_train_epoch` call of `args.steps` steps (shuffle, gather,
    augment, step: the real code path)."""

    def __init__(self, args, arrays):
        super().__init__(args)
        optimizer, _ = optim.make_optimizer(self.config, steps_per_epoch=args.steps)
        state = train.init_train_state(self.config, optimizer, shared_variables(args, self.model))
        self.state = parallel.replicate_tree(self.mesh, state)
        self.images = parallel.replicate(self.mesh, arrays["train_images"])
        self.labels = parallel.replicate(self.mesh, arrays["train_labels"])
        self.train_epoch = train.make_train_epoch(self.model, optimizer, self.config, self.mesh, args.steps)
        self.key = jax.random.PRNGKey(args.seed)
        self.calls = 0

    def describe(self) -> dict:
        return describe_common(self.config, self.train_epoch.loop)

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
        self.variables = parallel.replicate_tree(self.mesh, shared_variables(args, self.model))
        self.images = parallel.replicate(self.mesh, arrays["test_images"][: args.eval_images])
        self.labels = parallel.replicate(self.mesh, arrays["test_labels"][: args.eval_images])
        self.evaluate = evaluate.make_evaluate(self.model, self.config, self.mesh)

    def describe(self) -> dict:
        return {**describe_common(self.config, self.evaluate.loop), "eval_batch": self.config.eval_batch_size}

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
        self.variables = parallel.replicate_tree(self.mesh, shared_variables(args, self.model))
        images = arrays["test_images"][: args.gradcam_images]
        self.batches = [
            parallel.replicate(self.mesh, images[i : i + args.gradcam_batch]) for i in range(0, len(images), args.gradcam_batch)
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
    model = backends.model_from_config(config, num_classes=10)
    variables = shared_variables(args, model)
    images = arrays["test_images"][: args.parity_images]
    with jax.default_matmul_precision("highest"):
        apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x), train=False))
        logits = np.asarray(apply(variables, images))
        cams = np.asarray(gradcam.gradcam(model, variables, images[:8]))
    return {"logits": logits.tolist(), "cams": cams.tolist()}


def time_to_accuracy(args, arrays) -> dict:
    """The recipe for `--epochs` epochs from `--weights`: `train.train_epochs` (train an epoch,
    then `make_evaluate` on the whole test split); each first call's compilation is timed apart."""
    check_backend(args)
    config = config_for(
        args, epochs=args.epochs, batch_size=args.accuracy_batch, eval_batch_size=1000, train_subset=args.train_subset
    )
    dataset = data.Dataset(
        data.Split(arrays["train_images"], arrays["train_labels"]),
        data.Split(arrays["test_images"], arrays["test_labels"]),
        tuple(str(n) for n in range(10)),
        "benchmark arrays",
    )
    setup = train.prepare_run(config, dataset)
    variables = shared_variables(args, setup.model)
    state = parallel.replicate_tree(setup.mesh, train.init_train_state(config, setup.optimizer, variables))

    history, reached, compile_total = [], None, 0.0
    started = time.perf_counter()
    for result in train.train_epochs(setup, state, 0, config.epochs):
        elapsed = time.perf_counter() - started
        compile_seconds = result.compile_seconds + result.evaluation_compile_seconds
        compile_total += compile_seconds
        row = {
            "epoch": result.epoch,
            "train_loss": float(result.train["loss"]),
            "train_accuracy": float(result.train["accuracy"]),
            "test_accuracy": float(result.test["accuracy"]),
            "test_loss": float(result.test["loss"]),
            "seconds": result.seconds + result.compile_seconds,
            "elapsed": elapsed,
            "compile_seconds": compile_seconds,
        }
        history.append(row)
        if reached is None and args.target is not None and row["test_accuracy"] >= args.target:
            reached = elapsed
        if config.precision != "fp16" and int(result.train["first_nonfinite_step"]) >= 0:
            raise FloatingPointError(f"the jaxres training loss became non-finite at epoch {result.epoch}")
    wall_seconds = time.perf_counter() - started
    train_images, test_images = setup.train_images, setup.test_images
    tta = getattr(args, "tta", "none")
    return {
        "history": history,
        "final_accuracy": history[-1]["test_accuracy"],
        "wall_seconds": wall_seconds,
        **(final_tta_evaluation(setup, result.state, tta) if tta != "none" else {}),
        "compile_seconds": compile_total,
        "seconds_to_target": reached,
        **describe_common(config, result.epoch_loop),
        **device_memory(),
        "train_images": int(train_images.shape[0]),
        "test_images": int(test_images.shape[0]),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
    }


def final_tta_evaluation(setup: train.RunSetup, state: train.TrainState, tta: str) -> dict:
    """The final model on the test split with the test-time augmentation `tta`
    (`evaluate.make_evaluate`; flip: the mean of the logits of image and mirror), apart from
    the wall time: {tta, final_tta_accuracy, final_tta_loss, tta_seconds, tta_compile_seconds}."""
    evaluate_test = evaluate.make_evaluate(setup.model, setup.config, setup.mesh, tta=tta)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    evaluation, seconds, compile_seconds = timed(lambda: jax.device_get(evaluate_test(variables, setup.test_images, setup.test_labels)))
    return {
        "tta": tta,
        "final_tta_accuracy": float(evaluation["accuracy"]),
        "final_tta_loss": float(evaluation["loss"]),
        "tta_seconds": seconds,
        "tta_compile_seconds": compile_seconds,
    }
