"""Scores of class activation maps: how well they localise objects, how faithful they are.

    cams = gradcam.gradcam(model, variables, split.images)              # float32[N, H, W]
    energy_pointing_game(cams, split.masks)          # share of CAM energy on the object
    pointing_game_baseline(split.masks)              # what a uniform map scores
    deletion_insertion(model, variables, split.images, cams).deletion   # AUCs, float32[N]
    confidence_change(model, variables, split.images, cams)            # float32[N]
    drop_in_confidence(...), increase_in_confidence(...)   # pytorch-grad-cam's two summaries of it

Localisation needs object masks (the synthetic `shapes` source has them); faithfulness
runs the model again on images with the map's pixels removed or kept. Each metric is a
pure function of arrays; those that run the model are jitted like `jaxres.gradcam`,
whose input checks they share. This module imports `jaxres.gradcam`, never the reverse.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.augment import normalize as normalize_images
from jaxres.errors import JaxresError
from jaxres.gradcam import check_images, inference_variables, prepare_targets

SCORES = ("probability", "logit")


# --------------------------------------------------------------------------- localisation


def energy_pointing_game(cams, masks, per_image: bool = False) -> jax.Array:
    """Energy-based pointing game (Wang et al., Score-CAM 2020).

    Per image, the share of the map's energy that falls inside the object:
    sum(cam * mask) / sum(cam). A map with no energy (all zeros, e.g. a flat map
    after min-max normalisation) carries no localisation and is scored like a
    uniform map, i.e. the mask's area fraction (see `pointing_game_baseline`).

    Args:
      cams: float[N, H, W] maps, non-negative (negative values are clipped to 0),
        e.g. from `jaxres.gradcam.gradcam`.
      masks: bool[N, H, W] object masks, e.g. the `shapes` source's `Split.masks`.
      per_image: whether to return every image's score instead of their mean.

    Returns:
      The mean score over the images, a float32 scalar in [0, 1], or float32[N]
      with `per_image=True`.

    Raises:
      JaxresError: when `cams` is not [N, H, W] or `masks` has another shape.
    """
    cams = jnp.maximum(jnp.asarray(cams, jnp.float32), 0.0)
    masks = jnp.asarray(masks, bool)
    if cams.ndim != 3 or cams.shape != masks.shape:
        raise JaxresError(f"cams [N, H, W] and masks [N, H, W] must match, got {cams.shape} and {masks.shape}")
    inside = jnp.sum(jnp.where(masks, cams, 0.0), axis=(1, 2))
    total = jnp.sum(cams, axis=(1, 2))
    area = jnp.mean(masks.astype(jnp.float32), axis=(1, 2))
    scores = jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), area)
    return scores if per_image else jnp.mean(scores)


def pointing_game_baseline(masks) -> jax.Array:
    """What a uniform (or, in expectation, random) map scores in `energy_pointing_game`.

    That is the mean fraction of the image the masks cover: a map beats chance at
    localising the objects when its pointing-game score is above this.

    Args:
      masks: bool[N, H, W] object masks.

    Returns:
      A float32 scalar in [0, 1], the mean mask area fraction.

    Raises:
      JaxresError: when `masks` is not [N, H, W].
    """
    masks = jnp.asarray(masks, bool)
    if masks.ndim != 3:
        raise JaxresError(f"masks must be [N, H, W], got shape {masks.shape}")
    return jnp.mean(masks.astype(jnp.float32))


# --------------------------------------------------------------------------- faithfulness


class DeletionInsertion(NamedTuple):
    """Per-image areas under the curves and the curves themselves.

    deletion, insertion: float32[N]; fractions: float32[steps + 1] (share of pixels
    deleted / inserted at each step); deletion_curve, insertion_curve: float32[N, steps + 1].
    """

    deletion: jax.Array
    insertion: jax.Array
    fractions: jax.Array
    deletion_curve: jax.Array
    insertion_curve: jax.Array


def _class_scores(model, variables, inputs, targets, score: str) -> jax.Array:
    """The target class's probability or logit (`score`) per image: float32[N], of
    normalised inputs float32[N, H, W, 3] and targets int32[N]."""
    logits = model.apply(inference_variables(variables), inputs, train=False)
    if score == "probability":
        logits = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def gaussian_blur(inputs: jax.Array, size: int = 11, sigma: float = 5.0) -> jax.Array:
    """Per-channel Gaussian blur with zero padding (RISE's insertion baseline).

    A separable size x size Gaussian kernel of standard deviation `sigma`, normalised
    to sum 1, applied to each channel alone ("SAME" padding with zeros: on normalised
    images, zero is the dataset's mean colour).

    Args:
      inputs: float[N, H, W, C] images, normalised (`jaxres.augment.normalize`).
      size: the kernel's width and height in pixels.
      sigma: the Gaussian's standard deviation in pixels.

    Returns:
      float32[N, H, W, C], the blurred images.
    """
    offsets = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    weights = jnp.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / jnp.sum(weights)
    channels = inputs.shape[-1]
    kernel = jnp.broadcast_to((weights[:, None] * weights[None, :])[:, :, None, None], (size, size, 1, channels))
    return jax.lax.conv_general_dilated(
        jnp.asarray(inputs, jnp.float32),
        kernel,
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def _check_faithfulness_inputs(model, images, cams, score):
    """The checks `deletion_insertion` and `confidence_change` share (warnings blame their caller)."""
    check_images(images, stacklevel=4)
    shape = tuple(np.shape(cams))
    if shape != tuple(np.shape(images))[:3]:
        raise JaxresError(f"cams must be [N, H, W] matching the images {tuple(np.shape(images))[:3]}, got {shape}")
    if score not in SCORES:
        raise JaxresError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


@functools.partial(jax.jit, static_argnames=("model", "steps", "score", "insertion_baseline"))
def _deletion_insertion(model, variables, images, cams, targets, *, steps, score, insertion_baseline):
    inputs = normalize_images(images)
    count, height, width, _ = inputs.shape
    pixels = height * width
    if targets is None:
        targets = jnp.argmax(model.apply(inference_variables(variables), inputs, train=False), axis=-1)
    # rank[n, p]: position of pixel p in decreasing CAM order (ties: lower index first).
    order = jnp.argsort(-jnp.reshape(cams, (count, pixels)), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).reshape(count, height, width, 1)
    deletion_baseline = jnp.zeros_like(inputs)  # zero in normalised space: the mean colour
    if insertion_baseline == "blur":
        start = gaussian_blur(inputs)
    else:
        start = jnp.zeros_like(inputs)
    changed_counts = (jnp.arange(steps + 1) * pixels) // steps

    def scores_at(changed):
        selected = rank < changed
        deleted = jnp.where(selected, deletion_baseline, inputs)
        inserted = jnp.where(selected, inputs, start)
        both = _class_scores(model, variables, jnp.concatenate([deleted, inserted]), jnp.concatenate([targets, targets]), score)
        return both[:count], both[count:]

    deletion_curve, insertion_curve = jax.lax.map(scores_at, changed_counts)
    deletion_curve, insertion_curve = deletion_curve.T, insertion_curve.T  # [N, steps + 1]
    fractions = changed_counts.astype(jnp.float32) / pixels

    def area(curve):  # trapezoid rule over the fraction of pixels changed
        return jnp.sum((curve[:, 1:] + curve[:, :-1]) * 0.5 * jnp.diff(fractions), axis=-1)

    return DeletionInsertion(area(deletion_curve), area(insertion_curve), fractions, deletion_curve, insertion_curve)


def deletion_insertion(
    model,
    variables,
    images,
    cams,
    targets=None,
    steps: int = 32,
    score: str = "probability",
    insertion_baseline: str = "blur",
) -> DeletionInsertion:
    """Deletion and insertion curves and their AUCs (Petsiuk et al., RISE 2018).

    Pixels are ranked by `cams` (highest first; ties: lower index first). Deletion:
    starting from the image, the top k pixels are replaced by the baseline, zero in
    normalised space (the dataset's mean colour). Insertion: starting from the
    insertion baseline, the top k pixels of the image are put back. k goes from 0 to
    H*W in `steps` equal steps; the curve is the target class's score, and the AUC is
    the trapezoid area over the fraction of pixels changed (in [0, 1]). A faithful map
    has a low deletion AUC and a high insertion AUC. Costs steps + 1 forward passes
    over 2N images (sequential, `lax.map`); jitted, cached per (model, steps, score,
    insertion_baseline).

    Args:
      model: a jaxres Flax model (`model.num_classes` its classes), run in inference
        mode.
      variables: its {"params": ..., "batch_stats": ...}; other collections are
        ignored.
      images: uint8 or float[N, H, W, 3] pixel values in [0, 255], normalised here as
        in training (concrete float images all in [0, 1] give a UserWarning).
      cams: float[N, H, W] maps at the images' resolution (e.g. `gradcam`'s).
      targets: the class to score per image: None (the predicted class of the
        unchanged image), an int (one class for all) or ints[N].
      steps: how many equal steps from no pixel to all H*W pixels changed.
      score: "probability" (the target class's softmax probability) or "logit" (its
        pre-softmax logit).
      insertion_baseline: where insertion starts: "blur" (the image blurred by an
        11x11 Gaussian of sigma 5, as RISE; see `gaussian_blur`) or "mean" (the mean
        colour everywhere).

    Returns:
      A `DeletionInsertion`: deletion and insertion AUCs float32[N], the fractions
      float32[steps + 1] and both curves float32[N, steps + 1].

    Raises:
      JaxresError: for images not [N, H, W, 3], cams not matching them, an unknown
        score or insertion_baseline, steps not a positive int, or bad targets (not
        integers, not one per image, out of the model's class range).
    """
    _check_faithfulness_inputs(model, images, cams, score)
    if not isinstance(steps, int) or steps < 1:
        raise JaxresError(f"steps must be a positive int, got {steps!r}")
    if insertion_baseline not in ("blur", "mean"):
        raise JaxresError(f"unknown insertion_baseline {insertion_baseline!r}; choose blur or mean")
    targets = prepare_targets(targets, np.shape(images)[0], model.num_classes)
    return _deletion_insertion(
        model, variables, images, cams, targets, steps=steps, score=score, insertion_baseline=insertion_baseline
    )


@functools.partial(jax.jit, static_argnames=("model", "score"))
def _confidence_change(model, variables, images, cams, targets, *, score):
    inputs = normalize_images(images)
    if targets is None:
        targets = jnp.argmax(model.apply(inference_variables(variables), inputs, train=False), axis=-1)
    masked = inputs * jnp.asarray(cams, jnp.float32)[..., None]
    both = _class_scores(model, variables, jnp.concatenate([masked, inputs]), jnp.concatenate([targets, targets]), score)
    count = inputs.shape[0]
    return both[:count] - both[count:]


def confidence_change(model, variables, images, cams, targets=None, score: str = "probability") -> jax.Array:
    """Score of the CAM-masked image minus score of the image, per image.

    As pytorch-grad-cam's `CamMultImageConfidenceChange`: the normalised image is
    multiplied by the map, so the pixels the map ignores become 0 (the mean colour).
    Higher (less negative) is better: the map kept what the model needed. (This is
    not ROAD, which imputes removed pixels from their neighbours.) Jitted, cached per
    (model, score).

    Args:
      model, variables, images: as in `deletion_insertion` (images are uint8 or
        float[N, H, W, 3] pixel values in [0, 255]).
      cams: float[N, H, W] maps in [0, 1] at the images' resolution.
      targets: the class to score per image: None (the predicted class of the
        image), an int (one class for all) or ints[N].
      score: "probability" (the target class's softmax probability, as
        pytorch-grad-cam's `ClassifierOutputSoftmaxTarget`) or "logit" (its
        pre-softmax logit).

    Returns:
      float32[N]: each masked image's score minus the image's score.

    Raises:
      JaxresError: for images not [N, H, W, 3], cams not matching them, an unknown
        score, or bad targets (not integers, not one per image, out of range).
    """
    _check_faithfulness_inputs(model, images, cams, score)
    targets = prepare_targets(targets, np.shape(images)[0], model.num_classes)
    return _confidence_change(model, variables, images, cams, targets, score=score)


def drop_in_confidence(model, variables, images, cams, targets=None, score: str = "probability") -> jax.Array:
    """max(0, -confidence_change): how much the score falls when the image is multiplied by
    its map (pytorch-grad-cam 1.5.7 metrics/cam_mult_image.py DropInConfidence; lower is
    better). Arguments as `confidence_change`. Returns float32[N], >= 0."""
    return jnp.maximum(-confidence_change(model, variables, images, cams, targets, score), 0.0)


def increase_in_confidence(model, variables, images, cams, targets=None, score: str = "probability") -> jax.Array:
    """1 where the score rises when the image is multiplied by its map, else 0 (metrics/
    cam_mult_image.py IncreaseInConfidence: np.float32(scores > 0); its mean over images is
    the paper's "increase in confidence" rate). Arguments as `confidence_change`.
    Returns float32[N] of 0 and 1."""
    return (confidence_change(model, variables, images, cams, targets, score) > 0).astype(jnp.float32)
