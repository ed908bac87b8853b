"""Scores of class activation maps: how well they localise objects, how faithful they are.

    cams = gradcam.gradcam(model, variables, split.images)              # float32[N, H, W]
    energy_pointing_game(cams, split.masks)          # share of CAM energy on the object
    pointing_game_baseline(split.masks)              # what a uniform map scores
    deletion_insertion(model, variables, split.images, cams).deletion   # AUCs, float32[N]
    confidence_change(model, variables, split.images, cams)            # float32[N]
    drop_in_confidence(...), increase_in_confidence(...)   # pytorch-grad-cam's two summaries of it
    road(model, variables, split.images, cams, key=key).combined        # ROAD, float32[N]
    arcc(model, variables, split.images, cams, base, key=key).arcc      # ARCC, float32[N]

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

from jaxres.augment import CIFAR10_MEAN
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


# --------------------------------------------------------------------------- ROAD and ARCC (pytorch-grad-cam 1.5.7 metrics/road.py, arcc.py)

# metrics/road.py neighbors_weights: (row offset, column offset, weight), 1/6 for the four direct
# neighbours and 1/12 for the four diagonal ones (they sum to 1).
ROAD_NEIGHBOUR_WEIGHTS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
                          (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))  # fmt: skip
ROAD_NOISE = 0.01  # road.py NoisyLinearImputer(noise=0.01): std of the Gaussian noise on imputed pixels
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # road.py ROAD*Average / ROADCombined percentiles
ARCC_ROAD_PERCENTILES = (20, 40, 60, 80)  # arcc.py ARCC(road_percentiles=[20, 40, 60, 80])
ARCC_EPSILON = 1e-8  # arcc.py: cov / (std_a * std_b + 1e-8) and 1 / (x + 1e-8) in the harmonic mean
# The imputer's conjugate-gradient stopping rule: |residual| <= IMPUTER_TOLERANCE |b| per image and
# channel. float32 CG reaches it on 32 x 32 images within a few hundred iterations; the imputed
# values are then within ~1e-5 of scipy's float64 spsolve (the float32 floor: tighter gains nothing).
IMPUTER_TOLERANCE = 1e-8


def _neighbour_sum(values: jax.Array) -> jax.Array:
    """sum over the 8 neighbours of w * value (zero outside the image).  float[..., H, W] -> same."""
    height, width = values.shape[-2:]
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 2) + [(1, 1), (1, 1)])
    return sum(weight * padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx, weight in ROAD_NEIGHBOUR_WEIGHTS)


def _impute_channel(values: jax.Array, keep: jax.Array) -> jax.Array:
    """One channel float32[H, W], the pixels where keep bool[H, W] is False replaced by the
    solution of the imputer's linear system (see `noisy_linear_impute`)."""
    known = keep.astype(values.dtype)
    unknown = 1.0 - known
    weight_sums = _neighbour_sum(jnp.ones_like(values))  # road.py sum_neighbors: 1 minus the weights outside the image

    def operator(z):  # identity on the kept pixels; s_i z_i - sum_{removed j} w_ij z_j on the removed ones
        return unknown * (weight_sums * z - _neighbour_sum(unknown * z)) + known * z

    right_hand_side = unknown * _neighbour_sum(known * values) + known * values
    solution, _ = jax.scipy.sparse.linalg.cg(
        operator, right_hand_side, x0=known * values, tol=IMPUTER_TOLERANCE, maxiter=4 * values.size
    )
    return solution


@functools.partial(jax.jit, static_argnames=("noise",))
def noisy_linear_impute(inputs, keep, key=None, noise: float = ROAD_NOISE) -> jax.Array:
    """ROAD's noisy linear imputation (Rong et al. 2022; pytorch-grad-cam 1.5.7 metrics/road.py
    NoisyLinearImputer): every removed pixel becomes the weighted mean of its 8 neighbours,
    removed or not (weights ROAD_NEIGHBOUR_WEIGHTS: 1/6 direct, 1/12 diagonal; at the border
    only the neighbours inside the image, their weights not renormalised), plus Gaussian noise
    of standard deviation `noise` (ROAD_NOISE = 0.01) on the removed pixels only.

    inputs: float32[N, H, W, C] (normalised images, as the library's input_tensor); keep:
    bool[N, H, W], True where the pixel stays; key: a PRNG key (needed unless noise is 0).
    Returns float32[N, H, W, C]; kept pixels are unchanged.

    The library builds the sparse system of the removed pixels (s_i x_i - sum_{removed j} w_ij x_j
    = sum_{kept j} w_ij v_j, s_i the sum of pixel i's neighbour weights) with scipy and solves it
    with spsolve, one image at a time on the CPU. Here it is solved on the device, matrix-free:
    the matrix is symmetric positive definite wherever some pixel is kept (irreducibly
    diagonally dominant: every removed region touches a kept pixel), so conjugate gradients
    (jax.scipy.sparse.linalg.cg) on the implicit operator (the 3 x 3 stencil, identity on the
    kept pixels) solve it, vmapped over images and channels, each system with its own
    iteration and stopping rule (IMPUTER_TOLERANCE, relative). Against spsolve's float64 the
    imputed values agree to ~1e-5 (float32; tested), a thousandth of the noise. Where no pixel
    is kept the system is singular: spsolve returns NaN there, this gives 0 (the mean colour)
    plus the noise.
    """
    inputs = jnp.asarray(inputs, jnp.float32)
    keep = jnp.asarray(keep, bool)
    per_channel = jax.vmap(_impute_channel, in_axes=(0, None))  # [C, H, W], [H, W]
    channels_first = jnp.moveaxis(inputs, -1, 1)
    imputed = jnp.moveaxis(jax.vmap(per_channel)(channels_first, keep), 1, -1)
    if noise:
        if key is None:
            raise JaxresError("the noisy linear imputer adds noise: pass key=jax.random.key(seed), or noise=0")
        imputed = imputed + jnp.where(keep[..., None], 0.0, noise * jax.random.normal(key, imputed.shape, jnp.float32))
    return imputed


def otsu_threshold(levels) -> jax.Array:
    """Otsu's threshold of each map of grey levels, as OpenCV's cv2.threshold(...,
    THRESH_BINARY + THRESH_OTSU) finds it (imgproc/thresh.cpp getThreshVal_Otsu_8u): the
    first level t in 0..255 that maximises the between-class variance q1 q2 (mu1 - mu2)^2 of
    the pixels <= t and > t, over the t that leave pixels in both classes; 0 for a map of
    one level. levels: int[N, H, W] in [0, 255] -> int32[N].

    The histogram and its running sums are integers (exact); the variances are float32 where
    OpenCV's are double, so two levels whose variances agree to float32 rounding (a relative
    1e-7) may be chosen differently; levels in a run of empty bins tie exactly, and both
    take the first."""
    levels = jnp.asarray(levels, jnp.int32)
    count = levels.shape[1] * levels.shape[2]
    grey = jnp.arange(256, dtype=jnp.int32)
    histogram = jax.vmap(lambda image: jnp.bincount(image.reshape(-1), length=256))(levels)
    below = jnp.cumsum(histogram, axis=1)  # pixels <= t
    below_sum = jnp.cumsum(histogram * grey, axis=1)
    above, above_sum = count - below, below_sum[:, -1:] - below_sum
    valid = (below > 0) & (above > 0)
    f32 = jnp.float32
    mean_below = below_sum.astype(f32) / jnp.maximum(below, 1).astype(f32)
    mean_above = above_sum.astype(f32) / jnp.maximum(above, 1).astype(f32)
    weights = (below.astype(f32) / count) * (above.astype(f32) / count)
    variance = jnp.where(valid, weights * jnp.square(mean_below - mean_above), -1.0)
    return jnp.where(valid.any(axis=1), jnp.argmax(variance, axis=1), 0).astype(jnp.int32)


def otsu_keep(maps) -> jax.Array:
    """The pixels pytorch-grad-cam 1.5.7's ROAD keeps at percentile 'auto'
    (perturbation_confidence.py RemoveMostRelevantFirst): Otsu's threshold (`otsu_threshold`)
    of np.uint8(mask * 255), and the pixels above it kept (THRESH_BINARY's 255; the imputer
    imputes the zeros). That keeps the most relevant pixels and removes the rest, the other
    way round from a numeric percentile, which keeps mask < its percentile: the library's
    rule, followed as it is. maps: float[N, H, W] in [0, 1] -> bool[N, H, W]."""
    levels = jnp.clip(jnp.asarray(maps, jnp.float32) * 255.0, 0.0, 255.0).astype(jnp.int32)  # np.uint8 truncates
    return levels > otsu_threshold(levels)[:, None, None]


class ROAD(NamedTuple):
    """ROAD's scores (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods"; pytorch-grad-cam 1.5.7 metrics/road.py and perturbation_confidence.py).

    percentiles: float32[P]. most_relevant_first, least_relevant_first: float32[P, N], the
    score of the imputed image minus that of the image, per percentile p and image:
    ROADMostRelevantFirst(p) imputes the pixels whose map is >= the map's p-th percentile
    (keeps those below it: the library's mask < np.percentile(mask, p), so p = 80 removes the
    20 % most relevant), ROADLeastRelevantFirst(p) the same on 1 - map (removes the 100 - p %
    least relevant). A percentile NaN is the library's 'auto' (`otsu_keep`: Otsu's threshold
    instead of a percentile). The properties are the library's averages
    (AveragerAcrossThresholds: the mean over the percentiles) and ROADCombined, (least -
    most) / 2: higher is better.
    """

    percentiles: jax.Array
    most_relevant_first: jax.Array
    least_relevant_first: jax.Array

    @property
    def most_relevant_first_average(self) -> jax.Array:
        """float32[N]: most_relevant_first averaged over the percentiles."""
        return jnp.mean(self.most_relevant_first, axis=0)

    @property
    def least_relevant_first_average(self) -> jax.Array:
        """float32[N]: least_relevant_first averaged over the percentiles."""
        return jnp.mean(self.least_relevant_first, axis=0)

    @property
    def combined(self) -> jax.Array:
        """float32[N]: ROADCombined, (least_relevant_first_average - most_relevant_first_average) / 2;
        higher is better."""
        return (self.least_relevant_first_average - self.most_relevant_first_average) / 2


@functools.partial(jax.jit, static_argnames=("model", "score", "noise"))
def _road(model, variables, images, cams, targets, key, percentiles, *, score, noise):
    inputs = normalize_images(images)
    count = inputs.shape[0]
    if targets is None:
        targets = jnp.argmax(model.apply(inference_variables(variables), inputs, train=False), axis=-1)
    cams = jnp.asarray(cams, jnp.float32)
    before = _class_scores(model, variables, inputs, targets, score)

    orders = (cams, 1.0 - cams)
    otsu_keeps = [otsu_keep(maps) for maps in orders]  # percentile 'auto': the same at every step, computed once

    def at_percentile(arguments):
        percentile, step_key = arguments
        keeps = [
            jnp.where(jnp.isnan(percentile), auto, maps < jnp.percentile(maps, percentile, axis=(1, 2))[:, None, None])
            for maps, auto in zip(orders, otsu_keeps)
        ]  # fmt: skip
        keys = (None, None) if step_key is None else jax.random.split(step_key)
        imputed = jnp.concatenate([noisy_linear_impute(inputs, keep, k, noise) for keep, k in zip(keeps, keys)])
        after = _class_scores(model, variables, imputed, jnp.concatenate([targets, targets]), score)
        return after[:count] - before, after[count:] - before

    keys = None if key is None else jax.random.split(key, percentiles.shape[0])
    most, least = jax.lax.map(at_percentile, (percentiles, keys))
    return ROAD(percentiles, most, least)


def road(model, variables, images, cams, targets=None, percentiles=ROAD_PERCENTILES, *, key=None,
         score: str = "probability", noise: float = ROAD_NOISE) -> ROAD:  # fmt: skip
    """ROAD (RemOve And Debias) of `cams`, most- and least-relevant-first, at every percentile.

    Per percentile, the pixels to remove are imputed from their neighbours
    (`noisy_linear_impute`, the library's NoisyLinearImputer) and the model runs again; the
    result is the change of the target class's score (`ROAD`'s fields; its properties give the
    library's averages and ROADCombined). All 2 P N imputations and forward passes run on the
    device, N images (both orders) a step of `lax.map` over the percentiles. Jitted, cached per
    (model, score, noise).

    Args:
      model, variables, images: as in `deletion_insertion` (images are uint8 or float[N, H,
        W, 3] pixel values in [0, 255], normalised here; the imputation is in normalised space,
        as the library imputes its normalised input_tensor).
      cams: float[N, H, W] maps at the images' resolution (e.g. `gradcam`'s, in [0, 1]).
      targets: None (the predicted class of the image), an int or ints[N].
      percentiles: the percentiles p, numbers in [0, 100] (default ROAD_PERCENTILES, 10..90,
        as ROADCombined), or "auto" (alone or among them): the library's percentile 'auto',
        Otsu's threshold of the map (`otsu_keep`), recorded as NaN in `ROAD.percentiles`.
      key: a PRNG key for the imputer's noise (each percentile and order its own); needed
        unless noise is 0 (the library draws torch.randn, so results agree with it in
        distribution only; with noise 0 they agree exactly, up to float32).
      score: "probability" (the softmax probability, as ClassifierOutputSoftmaxTarget; ROAD's
        paper and ARCC assume it) or "logit" (ClassifierOutputTarget).
      noise: the noise's standard deviation (ROAD_NOISE, 0.01, the library's).

    Returns:
      `ROAD`: percentiles float32[P], most_relevant_first and least_relevant_first float32[P, N].

    Raises:
      JaxresError: as `confidence_change`, for percentiles outside [0, 100] or none, and for a
        missing key when noise is not 0.
    """
    _check_faithfulness_inputs(model, images, cams, score)
    percentiles = _road_percentiles(percentiles)
    if noise and key is None:
        raise JaxresError("ROAD's imputer adds noise: pass key=jax.random.key(seed), or noise=0")
    targets = prepare_targets(targets, np.shape(images)[0], model.num_classes)
    return _road(model, variables, images, cams, targets, None if not noise else key, jnp.asarray(percentiles),
                 score=score, noise=float(noise))  # fmt: skip


def _road_percentiles(percentiles) -> np.ndarray:
    """`road`'s percentiles as float32[P], "auto" as NaN; a JaxresError for anything else."""
    given = [percentiles] if isinstance(percentiles, str) else list(np.asarray(percentiles, object).reshape(-1))
    values = []
    for p in given:
        if isinstance(p, str) and p == "auto":
            values.append(np.nan)
        elif not isinstance(p, str) and isinstance(p, (int, float, np.integer, np.floating)) and 0 <= p <= 100:
            values.append(float(p))
        else:
            raise JaxresError(f"percentiles must be numbers in [0, 100] or 'auto', got {given}")
    if not values:
        raise JaxresError("percentiles must be numbers in [0, 100] or 'auto', got none")
    return np.asarray(values, np.float32)


def road_combined(model, variables, images, cams, targets=None, percentiles=ROAD_PERCENTILES, *, key=None,
                  score: str = "probability", noise: float = ROAD_NOISE) -> jax.Array:  # fmt: skip
    """ROADCombined (road.py): (mean over the percentiles of least-relevant-first - mean of
    most-relevant-first) / 2, float32[N]; higher is better. Arguments as `road`."""
    return road(model, variables, images, cams, targets, percentiles, key=key, score=score, noise=noise).combined


def pearson_coherency(a, b) -> jax.Array:
    """arcc.py batch_pearson_coherency: per map, cov(a, b) / (std_a std_b + ARCC_EPSILON), with
    the n - 1 (sample) covariance and deviations.  float[N, H, W] x2 -> float32[N]."""
    a = jnp.asarray(a, jnp.float32).reshape(np.shape(a)[0], -1)
    b = jnp.asarray(b, jnp.float32).reshape(np.shape(b)[0], -1)
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    dof = a.shape[1] - 1
    deviations = jnp.sqrt(jnp.sum(a * a, axis=1) / dof) * jnp.sqrt(jnp.sum(b * b, axis=1) / dof)
    return jnp.sum(a * b, axis=1) / dof / (deviations + ARCC_EPSILON)


class ARCC(NamedTuple):
    """ARCC and its three parts, each float32[N] (pytorch-grad-cam 1.5.7 metrics/arcc.py).

    complexity: mean |map| (Complexity); coherency: (pearson(map of the masked image, map) + 1)
    / 2 (Coherency); road: clip(2 ROADCombined, 0, 1) at ARCC_ROAD_PERCENTILES; arcc: their
    harmonic mean 3 / (1 / (coherency + e) + 1 / (1 - complexity + e) + 1 / (road + e)), e =
    ARCC_EPSILON. Higher is better."""

    arcc: jax.Array
    complexity: jax.Array
    coherency: jax.Array
    road: jax.Array


def arcc(model, variables, images, cams, base, targets=None, *, key=None, score: str = "probability",
         road_percentiles=ARCC_ROAD_PERCENTILES, noise: float = ROAD_NOISE) -> ARCC:  # fmt: skip
    """ARCC (arcc.py): the harmonic mean of coherency, 1 - complexity and ROAD.

    base: the CAM method the maps came from, a function (images float32[N, H, W, 3] pixel
    values in [0, 255], targets int32[N]) -> maps float32[N, H, W] in [0, 1], e.g.
    `lambda x, t: gradcam(model, variables, x, t, method="gradcam++")` or a RefineCAM
    (`jaxres.cam_meta.refinecam`); Coherency runs it on the images multiplied by their maps
    (the library's input_tensor * cam, in normalised space: here the pixels mean + cam (pixels
    - mean), whose normalisation is that product). targets: None (the predicted classes,
    resolved once and passed to `base` and ROAD), an int or ints[N]. key, score, noise: as in
    `road`, at `road_percentiles` (ARCC_ROAD_PERCENTILES: 20, 40, 60, 80). The library's ROAD
    "is between -0.5 and 0.5" only for probabilities: score "probability" is the default here.
    Returns `ARCC`."""
    _check_faithfulness_inputs(model, images, cams, score)
    if not callable(base):
        raise JaxresError(f"base must be the CAM method, a function (images, targets) -> maps; got {type(base).__name__}")
    count = np.shape(images)[0]
    targets = prepare_targets(targets, count, model.num_classes)
    if targets is None:
        targets = _predicted(model, variables, images)
    cams = jnp.asarray(cams, jnp.float32)
    complexity = jnp.mean(jnp.abs(cams), axis=(1, 2))  # Complexity: L1 norm / pixels
    mean = jnp.asarray(CIFAR10_MEAN, jnp.float32) * 255.0
    masked = jnp.clip(mean + cams[..., None] * (jnp.asarray(images, jnp.float32) - mean), 0.0, 255.0)
    coherency = (pearson_coherency(base(masked, targets), cams) + 1) / 2
    combined = road(model, variables, images, cams, targets, road_percentiles, key=key, score=score, noise=noise).combined
    road_part = jnp.clip(combined * 2, 0.0, 1.0)
    inverse = 1 / (coherency + ARCC_EPSILON) + 1 / ((1 - complexity) + ARCC_EPSILON) + 1 / (road_part + ARCC_EPSILON)
    return ARCC(3 / inverse, complexity, coherency, road_part)


@functools.partial(jax.jit, static_argnames=("model",))
def _predicted(model, variables, images):
    return jnp.argmax(model.apply(inference_variables(variables), normalize_images(images), train=False), axis=-1).astype(jnp.int32)
