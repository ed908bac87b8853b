"""Matplotlib figures of a run: training curves, the LR schedule, misclassified images.

Every function returns a `matplotlib.figure.Figure` built without pyplot's global
state (so it is safe in scripts, threads and notebooks alike); `save_figure` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `figure` as an image (format from the suffix, e.g. .png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_training_curves(history: Sequence[dict]) -> Figure:
    """Loss and accuracy (train and test) per epoch, from metrics.jsonl rows.

    history: dicts with "epoch" (int) and train/test "loss" and "accuracy" (in [0, 1]).
    The epoch axis has integer ticks only (no "epoch 1.5").
    """
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axes.plot(epochs, [row["test_loss"] for row in history], "s-", label="test")
    loss_axes.set(xlabel="epoch", ylabel="loss (label-smoothed cross-entropy)", title="Loss")
    accuracy_axes.plot(epochs, [100 * row["train_accuracy"] for row in history], "o-", label="train")
    accuracy_axes.plot(epochs, [100 * row["test_accuracy"] for row in history], "s-", label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def plot_lr_schedule(schedule, total_steps: int, steps_per_epoch: int) -> Figure:
    """The learning rate at every step, against epochs."""
    steps = np.arange(total_steps)
    rates = np.asarray(schedule(steps))
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.plot(steps / steps_per_epoch, rates)
    axes.set(xlabel="epoch", ylabel="learning rate", title="One-cycle learning-rate schedule")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_misclassified(
    images: np.ndarray, true_labels: np.ndarray, predicted_labels: np.ndarray, class_names: Sequence[str], columns: int = 5
) -> Figure:
    """A grid of images titled 'true / predicted'.  images: uint8[N, H, W, 3]."""
    count = len(images)
    rows = max(1, -(-count // columns))
    figure = Figure(figsize=(2 * columns, 2.2 * rows))
    axes_grid = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for axes in axes_grid:
        axes.axis("off")
    for axes, image, truth, guess in zip(axes_grid, images, true_labels, predicted_labels):
        axes.imshow(image, interpolation="nearest")
        axes.set_title(f"{class_names[truth]}\n→ {class_names[guess]}", fontsize=9, color="darkred")
    figure.suptitle("Misclassified test images (true → predicted)")
    figure.tight_layout()
    return figure


def save_run_plots(workdir, config, history, schedule, steps_per_epoch: int, dataset, predictions) -> None:
    """A finished run's curves.png, lr_schedule.png and (when any test image is wrong)
    misclassified.png in `workdir`. config: its TrainConfig; history: its metrics rows;
    dataset: its `jaxres.data.Dataset`; predictions: int[N] for the test split."""
    workdir = Path(workdir)
    save_figure(plot_training_curves(history), workdir / "curves.png")
    save_figure(plot_lr_schedule(schedule, config.epochs * steps_per_epoch, steps_per_epoch), workdir / "lr_schedule.png")
    wrong = np.flatnonzero(predictions != dataset.test.labels)
    if wrong.size > config.misclassified_to_plot:  # a seeded sample, so every class can show up
        wrong = np.sort(np.random.default_rng(config.seed).choice(wrong, config.misclassified_to_plot, replace=False))
    if wrong.size:
        figure = plot_misclassified(
            dataset.test.images[wrong], dataset.test.labels[wrong], predictions[wrong], dataset.class_names
        )
        save_figure(figure, workdir / "misclassified.png")
