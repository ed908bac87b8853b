"""Watching a run: the compile clock, the per-epoch progress bar, the metrics row and its
printed table, and the stop on a non-finite loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
from tqdm.auto import tqdm

from jaxres.errors import JaxresError


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

    def start(self, epoch: int, steps: int | None = None) -> None:
        """A new bar for epoch `epoch` of `steps` steps (default: a full epoch)."""
        self.bar = tqdm(total=steps or self.steps_per_epoch, desc=f"epoch {epoch}", leave=False, file=sys.stderr, unit="step")

    def update(self, step_index) -> None:
        """Show `step_index + 1` steps done (`step_index`, counted from 0, is an int or the 0-d
        array a `jax.debug.callback` passes); does nothing before `start` or after `close`."""
        if self.bar is not None:
            self.bar.n = int(step_index) + 1
            self.bar.refresh()

    def close(self) -> None:
        """Remove the current bar, if any (the bars do not stay on screen: leave=False)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


TABLE_HEADER = (
    f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} {'test_acc':>8}"
    f" {'seconds':>8} {'img/s':>9} {'loss_scale':>10} {'compile_s':>9}"
)


def format_row(row: dict) -> str:
    """One metrics row (see `jaxres.train.train_and_evaluate`) as a line under `TABLE_HEADER`."""
    return (
        f"{row['epoch']:>5d} {row['lr']:>8.4f} {row['train_loss']:>10.4f} {100 * row['train_accuracy']:>9.2f}"
        f" {row['test_loss']:>9.4f} {100 * row['test_accuracy']:>8.2f} {row['seconds']:>8.1f}"
        f" {row['images_per_second']:>9.0f} {row['loss_scale']:>10.0f} {row['compile_seconds']:>9.1f}"
    )


def metrics_row(result, schedule, steps_per_epoch: int, batch_size: int) -> dict:
    """The row of metrics.jsonl (and of the printed table) for an epoch's result
    (`jaxres.train.EpochResult`); schedule: the run's LR schedule. `steps_per_epoch` is the
    run's full epoch; a fractional last epoch has fewer (`result.steps`)."""
    steps = result.steps or steps_per_epoch
    return {
        "epoch": result.epoch,
        "lr": float(schedule((result.epoch - 1) * steps_per_epoch + steps - 1)),
        "train_loss": float(result.train["loss"]),
        "train_accuracy": float(result.train["accuracy"]),
        "test_loss": float(result.test["loss"]),
        "test_accuracy": float(result.test["accuracy"]),
        "seconds": result.seconds,
        "images_per_second": steps * batch_size / result.seconds,
        "loss_scale": float(result.train["loss_scale"]),
        "skipped_steps": int(result.train["skipped_steps"]),
        "compile_seconds": result.compile_seconds,
        "epoch_loop": result.epoch_loop,
    }


# --------------------------------------------------------------------------- non-finite numbers


class NonFiniteLossError(JaxresError):
    """The training loss became NaN or infinite (fp32/bf16; fp16 skips such steps instead)."""


def stop_advice(config, workdir: Path, epochs_saved: int) -> str:
    """What is left and what to try, after a run stopped on non-finite numbers."""
    kept = (
        f"The last good checkpoint (epoch {epochs_saved}) in {workdir} is intact."
        if epochs_saved > 0
        else "No checkpoint was written (no epoch finished well)."
    )
    remedies = ["a lower --peak-lr"] + ([] if config.precision == "fp32" else ["--precision fp32"])
    return f"{kept} Try {' or '.join(remedies)}."


def check_epoch_is_finite(config, workdir: Path, epoch: int, metrics: dict, test: dict, steps_per_epoch: int) -> None:
    """Raise NonFiniteLossError when the epoch numbered `epoch` (from 1) met a non-finite loss
    (fp32, bf16), trained on nothing (fp16: every step skipped, the loss scale shrinking), or
    ended with a non-finite test loss. metrics: the epoch's summary (see
    `jaxres.train.make_train_epoch`); test: its evaluation (`jaxres.evaluate.make_evaluate`)."""
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
    if not math.isfinite(float(test["loss"])):
        raise NonFiniteLossError(
            f"the test loss after epoch {epoch} is {float(test['loss'])}; stopping. " + stop_advice(config, workdir, epoch - 1)
        )
