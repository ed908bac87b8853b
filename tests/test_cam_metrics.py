"""Scores of class activation maps (jaxres.cam_metrics): each against an answer known in
closed form, on hand-made maps and a two-logit model."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.augment import CIFAR10_MEAN, normalize
from jaxres.cam_metrics import confidence_change, deletion_insertion, energy_pointing_game, gaussian_blur, pointing_game_baseline
from jaxres.errors import JaxresError


# --------------------------------------------------------------------------- localisation


def test_energy_pointing_game_by_hand():
    cams = np.array([[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
    masks = np.array([[[False, True], [False, False]], [[True, True], [True, False]], [[True, False], [False, False]]])
    per_image = np.asarray(energy_pointing_game(cams, masks, per_image=True))
    # 3 of 4; 6 of 8; an empty map scores like a uniform one (the mask's area, 1/4)
    np.testing.assert_allclose(per_image, [0.75, 0.75, 0.25])
    np.testing.assert_allclose(float(energy_pointing_game(cams, masks)), np.mean([0.75, 0.75, 0.25]), rtol=1e-6)
    np.testing.assert_allclose(float(pointing_game_baseline(masks)), np.mean([1 / 4, 3 / 4, 1 / 4]), rtol=1e-6)
    uniform = np.ones((3, 2, 2), np.float32)
    np.testing.assert_allclose(float(energy_pointing_game(uniform, masks)), float(pointing_game_baseline(masks)), rtol=1e-6)
    with pytest.raises(JaxresError, match="must match"):
        energy_pointing_game(cams, masks[:, :1])


# --------------------------------------------------------------------------- faithfulness


class RedMean(nn.Module):
    """Two logits: [scale * mean of the normalised red channel, 0]: scores known in closed form."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        red = jnp.mean(x[..., 0], axis=(1, 2)) * self.param("scale", nn.initializers.ones, ())
        return jnp.stack([red, jnp.zeros_like(red)], axis=-1)


def test_deletion_insertion_known_answer():
    model, variables = RedMean(), {"params": {"scale": jnp.asarray(1.0)}}
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    red = np.asarray(normalize(pixels))[..., 0].reshape(2, 16).astype(np.float64)
    cams = rng.random((2, 4, 4)).astype(np.float32)
    steps = 8
    result = deletion_insertion(model, variables, pixels, cams, 0, steps=steps, score="logit", insertion_baseline="mean")
    order = np.argsort(-cams.reshape(2, 16), axis=1, kind="stable")
    counts = np.arange(steps + 1) * 16 // steps
    deletion = np.zeros((2, steps + 1))
    insertion = np.zeros((2, steps + 1))
    for n in range(2):
        for s, k in enumerate(counts):
            chosen = np.zeros(16, bool)
            chosen[order[n, :k]] = True
            deletion[n, s] = red[n][~chosen].sum() / 16  # deleted pixels become 0 (the mean colour)
            insertion[n, s] = red[n][chosen].sum() / 16  # inserted into an all-zero (mean) image
    np.testing.assert_allclose(np.asarray(result.fractions), counts / 16)
    np.testing.assert_allclose(np.asarray(result.deletion_curve), deletion, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.insertion_curve), insertion, atol=1e-5)
    trapezoid = lambda y: ((y[:, 1:] + y[:, :-1]) / 2).sum(1) / steps  # noqa: E731
    np.testing.assert_allclose(np.asarray(result.deletion), trapezoid(deletion), atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.insertion), trapezoid(insertion), atol=1e-5)

    # An image of the mean colour is its own baseline: every step scores the same logit, 0.
    mean_colour = np.broadcast_to(np.array(CIFAR10_MEAN, np.float32) * 255, pixels.shape)
    constant = deletion_insertion(model, variables, mean_colour, cams, 0, steps=steps, score="logit", insertion_baseline="mean")
    np.testing.assert_allclose(np.asarray(constant.deletion_curve), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(constant.insertion), 0.0, atol=1e-6)
    # the blurred baseline and probabilities: insertion starts at the blurred image and ends
    # at the image itself, the probability of class 0 being sigmoid(red mean)
    blurred = deletion_insertion(model, variables, pixels, cams, None, steps=2)
    expected_start = np.asarray(gaussian_blur(normalize(pixels)))[..., 0].mean((1, 2))
    start_probability = 1 / (1 + np.exp(-expected_start))
    np.testing.assert_allclose(np.asarray(blurred.insertion_curve[:, 0]), start_probability, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blurred.insertion_curve[:, -1]), np.asarray(blurred.deletion_curve[:, 0]), atol=1e-6)
    with pytest.raises(JaxresError, match="cams must be"):
        deletion_insertion(model, variables, pixels, cams[:, :2], 0)


def test_confidence_change_known_answer():
    model, variables = RedMean(), {"params": {"scale": jnp.asarray(1.0)}}
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 255, (3, 4, 4, 3)).astype(np.float32)
    cams = rng.random((3, 4, 4)).astype(np.float32)
    red = np.asarray(normalize(pixels))[..., 0]
    change = np.asarray(confidence_change(model, variables, pixels, cams, 0, score="logit"))
    np.testing.assert_allclose(change, (red * cams).mean((1, 2)) - red.mean((1, 2)), atol=1e-6)
    ones = np.asarray(confidence_change(model, variables, pixels, np.ones_like(cams)))
    np.testing.assert_allclose(ones, 0.0, atol=1e-7)
    with pytest.raises(JaxresError, match="unknown score"):
        confidence_change(model, variables, pixels, cams, score="margin")
