"""Watching a run: the compile clock, the per-epoch progress bar, and the printed table."""

from __future__ import annotations

import sys

import jax
from tqdm.auto import tqdm


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
        self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}", leave=False, file=sys.stderr, unit="step")

    def update(self, step_index) -> None:
        if self.bar is not None:
            self.bar.n = int(step_index) + 1
            self.bar.refresh()

    def close(self) -> None:
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
