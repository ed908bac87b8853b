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


# --------------------------------------------------------------------------- ROAD and ARCC against pytorch-grad-cam 1.5.7


NEIGHBOURS_WEIGHTS = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                      ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]  # fmt: skip


def noisy_linear_imputer(img, mask):
    """metrics/road.py NoisyLinearImputer(noise=0) on img float32[C, H, W] and mask [H, W] (1 kept,
    0 imputed): setup_sparse_system, written out from its source, and scipy's spsolve; the
    solution back to float32 as torch.tensor(..., dtype=torch.float) does."""
    from scipy.sparse import csc_matrix, lil_matrix
    from scipy.sparse.linalg import spsolve

    height, width = mask.shape
    maskflt, imgflat = mask.flatten(), img.reshape(img.shape[0], -1)
    indices = np.argwhere(maskflt == 0).flatten()
    coords_to_vidx = np.zeros(len(maskflt), dtype=int)
    coords_to_vidx[indices] = np.arange(len(indices))
    a = lil_matrix((len(indices), len(indices)))
    b = np.zeros((len(indices), img.shape[0]))
    sum_neighbors = np.ones(len(indices))
    for (d0, d1), weight in NEIGHBOURS_WEIGHTS:
        cord0, cord1 = indices // width + d0, indices % width + d1
        valid = ~((cord0 < 0) | (cord1 < 0) | (cord0 >= height) | (cord1 >= width))
        new_coords = indices + d0 * width + d1
        valid_coords, valid_ids = new_coords[valid], np.argwhere(valid).flatten()
        has_values = maskflt[valid_coords] > 0.5
        b[valid_ids[has_values], :] -= weight * imgflat[:, valid_coords[has_values]].T
        a[valid_ids[~has_values], coords_to_vidx[valid_coords[~has_values]]] = weight
        sum_neighbors[~valid] -= weight
    a[np.arange(len(indices)), np.arange(len(indices))] = -sum_neighbors
    out = imgflat.copy()
    out[:, indices] = np.float32(spsolve(csc_matrix(a), b)).reshape(len(indices), -1).T
    return out.reshape(img.shape)


def road_reference(inputs, cams, targets, scores_of, percentiles, most_relevant_first):
    """perturbation_confidence.py PerturbationConfidenceMetric with RemoveMostRelevantFirst /
    RemoveLeastRelevantFirst (road.py ROAD*RelevantFirst, noise 0), one image at a time:
    float32[P, N] of score(imputed) - score(image). inputs float32[N, C, H, W] (normalised)."""
    scores = np.float32(scores_of(inputs, targets))
    rows = []
    for percentile in percentiles:
        perturbed = []
        for img, cam in zip(inputs, cams):
            mask = cam if most_relevant_first else 1 - cam
            if percentile == "auto":  # cv2.threshold(np.uint8(mask * 255), 0, 255, THRESH_BINARY + THRESH_OTSU)
                levels = np.uint8(mask * 255)
                binary_mask = np.float32(np.where(levels > otsu_reference(levels)[0], 255, 0))
            else:
                binary_mask = np.float32(mask < np.percentile(mask, percentile))
            perturbed.append(noisy_linear_imputer(img, binary_mask))
        rows.append(np.float32(scores_of(np.stack(perturbed), targets)) - scores)
    return np.array(rows)


def otsu_reference(levels):
    """OpenCV's Otsu threshold (imgproc/thresh.cpp getThreshVal_Otsu_8u), its loop in float64:
    (threshold, the margin of the best between-class variance over the second best, relative)."""
    histogram = np.bincount(np.asarray(levels).reshape(-1), minlength=256).astype(np.float64) / np.size(levels)
    mu = float(np.sum(np.arange(256) * histogram))
    mu1 = q1 = 0.0
    max_sigma, max_val, sigmas = 0.0, 0, []
    eps = float(np.finfo(np.float32).eps)  # FLT_EPSILON
    for i in range(256):
        p_i = histogram[i]
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < eps or max(q1, q2) > 1.0 - eps:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
        sigmas.append(sigma)
        if sigma > max_sigma:
            max_sigma, max_val = sigma, i
    distinct = sorted(set(sigmas), reverse=True)
    margin = 1.0 if len(distinct) < 2 else (distinct[0] - distinct[1]) / distinct[0]
    return max_val, margin


def test_otsu_threshold_is_opencvs():
    """Against OpenCV's loop (`otsu_reference`) on maps of every kind ROAD meets: smooth CAMs,
    noise, a few levels with empty bins between them, two levels, one level. Where the two best
    levels' variances lie within float32 rounding of each other either may win; nowhere else."""
    from jaxres.cam_metrics import otsu_keep, otsu_threshold

    rng = np.random.default_rng(3)
    smooth = np.asarray(gaussian_blur(jnp.asarray(rng.random((24, 32, 32, 1)), jnp.float32), 9, 3.0))[..., 0]
    smooth = (smooth - smooth.min((1, 2), keepdims=True)) / np.ptp(smooth, (1, 2), keepdims=True)
    maps = np.concatenate([
        np.uint8(smooth * 255),
        rng.integers(0, 256, (8, 32, 32)),
        rng.choice([3, 40, 41, 200], (4, 32, 32)),  # empty runs of bins: exact ties, the first wins
        np.where(rng.random((2, 32, 32)) < 0.3, 10, 250),
        np.full((2, 32, 32), 77),
    ]).astype(np.int32)  # fmt: skip
    got = np.asarray(otsu_threshold(maps))
    references = [otsu_reference(m) for m in maps]
    decided = [i for i, (_, margin) in enumerate(references) if margin > 1e-6]  # float32: <= ~5e-7 relative
    assert len(decided) >= len(maps) - 2
    np.testing.assert_array_equal(got[decided], [references[i][0] for i in decided])
    assert got[-1] == 0 and 10 <= got[-3] < 250
    keep = np.asarray(otsu_keep(smooth.astype(np.float32)))
    levels = np.uint8(smooth.astype(np.float32) * 255)
    np.testing.assert_array_equal(keep, levels > got[:24, None, None])
    assert 0 < keep.mean() < 1


@pytest.fixture(scope="module")
def small():
    """A CustomResNet of width 0.0625 with random weights, three shapes images, smooth maps
    without ties (Gaussian-blurred noise, ranked, so every percentile splits the pixels cleanly), and
    the model as a black box: scores_of(normalised float32[B, 3, H, W], targets) -> probabilities.
    The classifier's kernel is scaled by 30: a random network's logits hardly depend on the
    image (they move by ~1e-2 from an image to the mean colour), so its probabilities would
    hardly move under any imputation."""
    import jax

    from jaxres.data.shapes import make_shapes
    from jaxres.models import CustomResNet
    from tests.helpers import random_variables

    model = CustomResNet(width=0.0625)
    variables = random_variables(model, seed=0)
    classifier = {**variables["params"]["classifier"], "kernel": variables["params"]["classifier"]["kernel"] * 30}
    variables = {**variables, "params": {**variables["params"], "classifier": classifier}}
    images = make_shapes(num_train=1, num_test=3, seed=0).test.images
    rng = np.random.default_rng(0)
    blurred = np.asarray(gaussian_blur(jnp.asarray(rng.random((3, 32, 32, 1)), jnp.float32), 9, 3.0))[..., 0]
    # each map's pixels ranked, their values k / 1023: as smooth, and evenly spaced, so that every
    # percentile used here (rank p / 100 * 1023, fractional part >= 0.1) lies >= 1e-4 from any
    # pixel and the masks cannot depend on how a percentile's interpolation rounds
    ranks = np.argsort(np.argsort(blurred.reshape(3, -1), axis=1), axis=1).reshape(blurred.shape)
    cams = ranks / np.float32(ranks[0].size - 1)
    apply = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False)))

    def scores_of(inputs, targets):
        return np.asarray(apply(jnp.asarray(np.transpose(inputs, (0, 2, 3, 1)))))[np.arange(len(targets)), targets]

    return model, variables, images, np.float32(cams), scores_of


def test_noisy_linear_imputer_matches_scipys_spsolve():
    """The sparse system solved by conjugate gradients on the device, against road.py's scipy
    spsolve (float64), where 10 %, 50 % and 90 % of the pixels are kept around one smooth map."""
    from jaxres.cam_metrics import noisy_linear_impute

    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    cam = np.asarray(gaussian_blur(jnp.asarray(rng.random((1, 32, 32, 1)), jnp.float32), 11, 4.0))[0, ..., 0]
    keep = np.stack([cam < np.percentile(cam, p) for p in (10, 50, 90)])
    got = np.asarray(noisy_linear_impute(inputs, keep, noise=0.0))
    expected = np.stack([noisy_linear_imputer(x.transpose(2, 0, 1), np.float32(k)).transpose(1, 2, 0) for x, k in zip(inputs, keep)])
    assert np.abs(expected - inputs).max() > 1  # the imputation changed something
    np.testing.assert_array_equal(got[keep], inputs[keep])
    # float32 CG against float64 spsolve: ~eps * cond(A) * |x| (cond ~ 1e3 for a 32 x 32 hole)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    noisy = np.asarray(noisy_linear_impute(inputs, keep, jax_key(0)))
    noise = (noisy - got)[~keep]
    np.testing.assert_array_equal(noisy[keep], inputs[keep])
    assert abs(noise.std() - 0.01) < 1e-3 and abs(noise.mean()) < 1e-3  # road.py: noise * torch.randn_like
    assert np.abs(np.asarray(noisy_linear_impute(inputs, keep, jax_key(1))) - noisy).max() > 0
    with pytest.raises(JaxresError, match="pass key"):
        noisy_linear_impute(inputs, keep)


def jax_key(seed):
    import jax

    return jax.random.key(seed)


def test_road_matches_pytorch_grad_cam(small):
    from jaxres.cam_metrics import ROAD_PERCENTILES, road, road_combined

    model, variables, images, cams, scores_of = small
    targets = np.array([0, 8, 2])  # the likeliest classes: their probabilities move most
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)
    result = road(model, variables, images, cams, targets, noise=0.0)
    most = road_reference(inputs, cams, targets, scores_of, ROAD_PERCENTILES, True)
    least = road_reference(inputs, cams, targets, scores_of, ROAD_PERCENTILES, False)
    assert np.abs(most).max() > 1e-3 and np.abs(least).max() > 1e-3
    # the same float32 network on images that agree to ~1e-5 (the imputer's float32 floor)
    np.testing.assert_allclose(np.asarray(result.most_relevant_first), most, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(result.least_relevant_first), least, rtol=0, atol=2e-5)
    # AveragerAcrossThresholds: np.mean(np.float32(scores), axis=0); ROADCombined: (lerf - morf) / 2
    np.testing.assert_allclose(np.asarray(result.combined), (least.mean(0) - most.mean(0)) / 2, rtol=0, atol=2e-5)
    combined = road_combined(model, variables, images, cams, targets, noise=0.0)
    np.testing.assert_array_equal(np.asarray(combined), np.asarray(result.combined))
    noisy = road(model, variables, images, cams, targets, key=jax_key(0))
    assert 0 < np.abs(np.asarray(noisy.combined) - np.asarray(result.combined)).max() < 1e-2
    with pytest.raises(JaxresError, match="pass key"):
        road(model, variables, images, cams, targets)
    with pytest.raises(JaxresError, match="percentiles must be"):
        road(model, variables, images, cams, targets, percentiles=[120], noise=0.0)
    for bad in ("otsu", [50, "Auto"], [], [float("nan")]):
        with pytest.raises(JaxresError, match="percentiles must be numbers in \\[0, 100\\] or 'auto'"):
            road(model, variables, images, cams, targets, percentiles=bad, noise=0.0)


def test_road_percentile_auto_is_the_librarys_otsu_rule(small):
    """percentile 'auto' (perturbation_confidence.py): Otsu's threshold of np.uint8(mask * 255),
    the pixels above it kept; alone and among numeric percentiles."""
    from jaxres.cam_metrics import road

    model, variables, images, cams, scores_of = small
    # squared: the ranked maps' histograms are symmetric, where Otsu's best two levels tie exactly
    # (OpenCV's double rounding then picks one, float32 the other); these have a clear best level
    cams = np.float32(cams**2)
    for maps in (cams, 1 - cams):
        assert min(otsu_reference(np.uint8(m * 255))[1] for m in maps) > 1e-6
    targets = np.array([0, 8, 2])
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)
    result = road(model, variables, images, cams, targets, percentiles=["auto", 30], noise=0.0)
    assert np.isnan(result.percentiles[0]) and result.percentiles[1] == 30
    for got, order in ((result.most_relevant_first, True), (result.least_relevant_first, False)):
        expected = road_reference(inputs, cams, targets, scores_of, ["auto", 30], order)
        assert np.abs(expected[0]).max() > 2e-4  # ten times the tolerance below
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)
    alone = road(model, variables, images, cams, targets, percentiles="auto", noise=0.0)
    np.testing.assert_array_equal(np.asarray(alone.most_relevant_first), np.asarray(result.most_relevant_first[:1]))


def test_road_without_a_kept_pixel_imputes_the_mean_colour(small):
    """A flat map keeps no pixel in most-relevant-first (nothing is below its percentile): the
    library's system is singular there (spsolve: NaN); here every pixel becomes 0, the mean colour."""
    from jaxres.cam_metrics import noisy_linear_impute, road

    model, variables, images, _, scores_of = small
    flat = np.full((3, 32, 32), 0.5, np.float32)
    result = road(model, variables, images, flat, [0, 1, 2], percentiles=[50], noise=0.0)
    zero = np.zeros((3, 3, 32, 32), np.float32)
    before = scores_of(np.asarray(normalize(images)).transpose(0, 3, 1, 2), [0, 1, 2])
    np.testing.assert_allclose(np.asarray(result.most_relevant_first)[0], scores_of(zero, [0, 1, 2]) - before, atol=1e-6)
    assert not np.asarray(noisy_linear_impute(np.ones((1, 4, 4, 3)), np.zeros((1, 4, 4), bool), noise=0.0)).any()


def test_arcc_matches_pytorch_grad_cam(small):
    """metrics/arcc.py: Complexity, Coherency (batch_pearson_coherency of the base method's map
    of input_tensor * cam and the map), ROADCombined at 20/40/60/80, and their harmonic mean."""
    from jaxres.augment import CIFAR10_STD
    from jaxres.cam_metrics import ARCC_ROAD_PERCENTILES, arcc, pearson_coherency, road
    from jaxres.gradcam import gradcam

    model, variables, images, cams, scores_of = small
    targets = np.array([0, 8, 2])  # the likeliest classes: their probabilities move most

    def base(pixels, classes):
        return gradcam(model, variables, pixels, classes, layer="layer2", method="gradcam++")

    # Smooth maps without ties (a Grad-CAM map's zeros tie: the library's most-relevant-first
    # then keeps no pixel and gives NaN), each oriented so that its ROAD part is not clipped to 0
    # (MoRF of 1 - map is LeRF of the map, so the orientation flips ROADCombined's sign).
    combined = np.asarray(road(model, variables, images, cams, targets, ARCC_ROAD_PERCENTILES, noise=0.0).combined)
    cams = np.where((combined < 0)[:, None, None], 1 - cams, cams)
    result = arcc(model, variables, images, cams, base, targets, noise=0.0)
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)

    def batch_pearson_coherency(a, b):
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        cov = (a * b).sum(1) / (a.shape[1] - 1)
        return cov / (np.sqrt((a**2).sum(1) / (a.shape[1] - 1)) * np.sqrt((b**2).sum(1) / (b.shape[1] - 1)) + 1e-8)

    complexity = np.abs(cams).reshape(3, -1).sum(1) / (32 * 32)
    mixed = inputs * cams[:, None]  # input_tensor * tensor_cams, normalised; the base takes pixels
    pixels = (mixed.transpose(0, 2, 3, 1) * np.float32(CIFAR10_STD) + np.float32(CIFAR10_MEAN)) * 255
    coherency = (batch_pearson_coherency(np.asarray(base(np.float32(pixels), targets)), cams) + 1) / 2
    most, least = (road_reference(inputs, cams, targets, scores_of, ARCC_ROAD_PERCENTILES, order) for order in (True, False))
    road_part = np.clip((least.mean(0) - most.mean(0)) / 2 * 2, 0, 1)
    expected = 3 * (1 / (coherency + 1e-8) + 1 / ((1 - complexity) + 1e-8) + 1 / (road_part + 1e-8)) ** -1
    np.testing.assert_allclose(np.asarray(result.complexity), complexity, rtol=1e-5)  # float32 sums of 1,024 terms in two orders
    np.testing.assert_allclose(np.asarray(result.coherency), coherency, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.road), road_part, rtol=0, atol=4e-5)
    assert np.all(road_part > 1e-3), "a clipped ROAD part would make the harmonic mean ~0 and the comparison vacuous"
    np.testing.assert_allclose(np.asarray(result.arcc), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pearson_coherency(cams, cams)), 1.0, rtol=1e-5)
