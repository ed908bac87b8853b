"""One learning test on the real CIFAR-10 copy: a small model, a small subset, a few hundred steps."""

import pytest

from jaxres import train
from jaxres.config import TrainConfig


@pytest.mark.slow
def test_small_model_learns_real_cifar10_well_above_chance(cifar10_dataset, tmp_path):
    config = TrainConfig(
        data="cifar10-jpeg (fixture)",
        width=0.125,
        epochs=6,
        batch_size=128,
        train_subset=6000,  # 46 steps per epoch, 276 steps in all
        peak_lr=0.4,
        workdir=str(tmp_path / "run"),
    )
    result = train.train_and_evaluate(config, dataset=cifar10_dataset, progress=False, log=print)
    accuracies = [row["test_accuracy"] for row in result.history]
    # chance is 10 %; this setting reached 56 % on the 10,000 test images here
    assert accuracies[-1] > 0.35, accuracies
    assert accuracies[-1] > accuracies[0], "accuracy should improve over training"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
