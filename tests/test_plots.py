"""Figures of a run (jaxres.plots)."""

from __future__ import annotations

import numpy as np

from jaxres.plots import plot_training_curves


def test_training_curves_have_integer_epoch_ticks():
    history = [
        {"epoch": epoch, "train_loss": 2.0 / epoch, "test_loss": 2.1 / epoch, "train_accuracy": 0.3 * epoch, "test_accuracy": 0.28 * epoch}
        for epoch in (1, 2, 3)
    ]
    figure = plot_training_curves(history)
    figure.canvas.draw()  # tick labels are filled in when the figure is drawn
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        labels = [label.get_text() for label in axes.get_xticklabels() if label.get_text()]
        assert len(ticks) >= 2 and np.array_equal(ticks, np.round(ticks)), ticks
        assert labels and all(label.isdigit() for label in labels), labels
        assert {"1", "2", "3"} <= set(labels)
