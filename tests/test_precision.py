"""The fp16 loss scale (`jaxres.precision`) against PyTorch's GradScaler rule and flax's DynamicScale."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax.training.dynamic_scale import DynamicScale

from jaxres import precision

# finite (1) and overflowing (0) steps: growth after 3 finite steps in a row, a backoff, growth again
STEPS = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
INTERVAL = 3


def jaxres_scales(steps):
    state, scales = precision.init_loss_scale(4.0), []
    for finite in steps:
        state = precision.update_loss_scale(state, jnp.asarray(bool(finite)), growth_interval=INTERVAL)
        scales.append(float(state.scale))
    return scales


def test_loss_scale_follows_pytorch_gradscaler_step_for_step():
    torch = pytest.importorskip("torch")
    scale, tracker, expected = torch.tensor([4.0]), torch.tensor([0], dtype=torch.int32), []
    for finite in STEPS:
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0 if finite else 1.0]), 2.0, 0.5, INTERVAL)
        expected.append(float(scale))
    assert jaxres_scales(STEPS) == expected
    assert expected[:5] == [4.0, 4.0, 8.0, 8.0, 4.0]  # grows on the 3rd finite step, halves on the overflow


def test_flax_dynamic_scale_grows_one_step_later_which_is_why_jaxres_has_its_own():
    """flax's DynamicScale on the same steps: its growth comes one finite step after
    GradScaler's (and jaxres's), so it cannot reproduce the PyTorch recipe's loss scale."""
    dynamic, flax_scales = DynamicScale(growth_factor=2.0, backoff_factor=0.5, growth_interval=INTERVAL, scale=4.0), []
    for finite in STEPS:
        gradient = jnp.asarray(1.0 if finite else np.inf)
        dynamic, _, _, _ = dynamic.value_and_grad(lambda p: (p * gradient).sum())(jnp.ones(()))
        flax_scales.append(float(dynamic.scale))
    ours = jaxres_scales(STEPS)
    first_growth = lambda scales: next(i for i, s in enumerate(scales) if s > 4.0)  # noqa: E731
    assert first_growth(flax_scales) == first_growth(ours) + 1
    assert flax_scales != ours


def test_an_overflowing_step_halves_the_scale_and_restarts_the_count():
    state = precision.update_loss_scale(precision.init_loss_scale(8.0), jnp.asarray(False), growth_interval=INTERVAL)
    assert float(state.scale) == 4.0 and int(state.good_steps) == 0
