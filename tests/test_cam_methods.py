"""The CAM methods of jaxres.cam_methods against NumPy references written from pytorch-grad-cam
1.5.7's source (NCHW, float64 unless the library itself works in float32, one image at a
time as it does), plus batching, jit and grad.

Tolerances (float32, eps = 2**-23 ~ 1.2e-7, on any x86 CPU):
- a sum of K float32 terms is within K eps sum_k |term_k| of the exact sum (the worst-case
  bound of recursive summation, gamma_K); `sum_bound` is that, per test, from the terms;
- a projection on the first principal component: the SVD's backward error is O((m + n) eps
  ||X||) for an m x n matrix, and the singular vector moves by that over the gap s1 - s2
  (Davis-Kahan), so the projection is within (m + n) eps s1 (1 + s1 / (s1 - s2)); each test
  checks that the gap is not tiny, so the bound is not vacuous;
- scores of whole forward passes (Score-CAM, Ablation-CAM): the same float32 network on
  inputs that agree to a few eps; its ~10 layers of sums over up to 9 * 128 terms give logits
  within ~1e-6 relative of each other, so scores and weights are compared at 1e-5 relative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import cam_methods
from jaxres import gradcam as cam_lib
from jaxres.augment import normalize
from jaxres.errors import JaxresError
from jaxres.gradcam import gradcam
from jaxres.models import CustomResNet
from tests.helpers import random_variables
from tests.test_gradcam import WIDTH, model, variables  # noqa: F401  (the same model and random weights, as fixtures)

EPS = float(np.finfo(np.float32).eps)
TARGETS = np.array([0, 3, 5, 7])


@pytest.fixture(scope="module")
def images():
    from jaxres.data.shapes import make_shapes

    return make_shapes(num_train=1, num_test=4, seed=0).test.images


@pytest.fixture(scope="module")
def passes(model, variables, images):
    """layer -> (logits, A, G) as float64 NCHW NumPy arrays, from jaxres's two passes
    (themselves tested against closed forms in tests/test_gradcam.py)."""
    out = {}
    for layer in ("layer2", "layer3"):
        logits, _, activation, gradient = jax.jit(
            lambda v, x: cam_methods.stage_activation_and_gradient(model, v, normalize(x), jnp.asarray(TARGETS), layer)
        )(variables, images)
        out[layer] = tuple(np.asarray(a, np.float64) for a in (logits, activation.transpose(0, 3, 1, 2), gradient.transpose(0, 3, 1, 2)))
    return out


def nhwc(array):
    return jnp.asarray(np.asarray(array).transpose(0, 2, 3, 1), jnp.float32)


def sum_bound(terms, axis=1):
    """K eps sum_k |term_k|: the float32 error bound of a sum of K terms (see the docstring)."""
    return terms.shape[axis] * EPS * np.abs(terms).sum(axis=axis).max()


# --------------------------------------------------------------------------- NumPy references (pytorch-grad-cam 1.5.7)


def get_2d_projection(activation_batch):
    """utils/svd_on_activations.py get_2d_projection, [N, K, h, w] -> [N, h, w], and the
    largest ratio s1 / (s1 - s2) over the batch (for the tolerance)."""
    activation_batch = activation_batch.copy()
    activation_batch[np.isnan(activation_batch)] = 0
    projections, ratios, tops = [], [], []
    for activations in activation_batch:
        reshaped = activations.reshape(activations.shape[0], -1).transpose()
        reshaped = reshaped - reshaped.mean(axis=0)
        _, s, vt = np.linalg.svd(reshaped, full_matrices=True)
        projections.append((reshaped @ vt[0, :]).reshape(activations.shape[1:]))
        ratios.append(s[0] / (s[0] - s[1]))
        tops.append(s[0])
    return np.array(projections), max(ratios), max(tops)


def assert_projection_close(got, maps):
    """`got` [N, h, w] against get_2d_projection(maps [N, K, h, w]), per image up to sign."""
    expected, ratio, top = get_2d_projection(maps)
    assert ratio < 50, "first singular value nearly repeated: the comparison would be vacuous"
    got = np.asarray(got, np.float64)
    signs = np.sign(np.sum(got * expected, axis=(1, 2)))[:, None, None]
    count, channels, height, width = maps.shape
    atol = (height * width + channels) * EPS * top * (1 + ratio)
    np.testing.assert_allclose(got * signs, expected, rtol=0, atol=atol)


def base_cam_image(weights, activations, eigen_smooth=False):
    """base_cam.py get_cam_image."""
    weighted = weights[:, :, None, None] * activations
    return get_2d_projection(weighted)[0] if eigen_smooth else weighted.sum(axis=1)


def fem(activations, k=2):
    """fem.py FEM.get_cam_image."""
    means = np.mean(activations, axis=(2, 3))
    stds = np.std(activations, axis=(2, 3))
    th = (means + k * stds)[:, :, None, None]
    weights = (activations > th).mean(axis=(2, 3))
    return (weights[:, :, None, None] * activations).sum(axis=1)


def upsampling_bilinear_align_corners(maps, size):
    """torch.nn.UpsamplingBilinear2d(size) on float32 [N, K, h, w], pixel by pixel."""
    _, _, h, w = maps.shape
    out_h, out_w = size
    ys = np.arange(out_h) * ((h - 1) / (out_h - 1))
    xs = np.arange(out_w) * ((w - 1) / (out_w - 1))
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = maps[:, :, y0][:, :, :, x0] * (1 - dx) + maps[:, :, y0][:, :, :, x1] * dx
    bottom = maps[:, :, y1][:, :, :, x0] * (1 - dx) + maps[:, :, y1][:, :, :, x1] * dx
    return (top * (1 - dy) + bottom * dy).astype(np.float32)


def score_cam_weights(inputs_nchw, activations, targets, scores_of, batch_size=16):
    """score_cam.py get_cam_weights, float32 as the library (torch), with the model as a black
    box scores_of(images float32[B, 3, H, W], target) -> float[B]."""
    upsampled = upsampling_bilinear_align_corners(activations.astype(np.float32), inputs_nchw.shape[-2:])
    maxs = upsampled.reshape(*upsampled.shape[:2], -1).max(-1)[:, :, None, None]
    mins = upsampled.reshape(*upsampled.shape[:2], -1).min(-1)[:, :, None, None]
    upsampled = (upsampled - mins) / (maxs - mins + np.float32(1e-8))
    input_tensors = inputs_nchw[:, None] * upsampled[:, :, None]
    scores = []
    for target, tensor in zip(targets, input_tensors):
        for i in range(0, tensor.shape[0], batch_size):
            scores.extend(scores_of(tensor[i : i + batch_size], target))
    scores = np.float32(scores).reshape(activations.shape[:2])
    exponentials = np.exp(scores - scores.max(-1, keepdims=True))
    return exponentials / exponentials.sum(-1, keepdims=True)


def ablation_layer_outputs(activation, channels, batch_size=32):
    """ablation_layer.py AblationLayer.__call__ after set_next_batch, for one image's
    activation [K, h, w], float32 as in torch, channels ablated `batch_size` at a time, in
    place (so the i-th copy sees the copies before it already written)."""
    batches = []
    for start in range(0, len(channels), batch_size):
        indices = channels[start : start + batch_size]
        output = np.repeat(activation[None].astype(np.float32), len(indices), axis=0)
        for i in range(output.shape[0]):
            if output.min() == 0:
                output[i, indices[i], :] = 0
            else:
                output[i, indices[i], :] = output.min() - np.float32(1e7)
        batches.append(output)
    return np.concatenate(batches)


# --------------------------------------------------------------------------- formulas of A and G


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_gradcam_elementwise_and_fem_match_numpy(passes, layer):
    _, activation, gradient = passes[layer]
    terms = np.maximum(gradient * activation, 0)  # grad_cam_elementwise.py
    got = cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "gradcam_elementwise")
    np.testing.assert_allclose(np.asarray(got), terms.sum(1), rtol=0, atol=sum_bound(terms))
    expected = fem(activation)
    assert np.abs(expected).max() > 0
    got = cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "fem")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=sum_bound(activation))


def test_segeigencam_matches_numpy_with_its_sign(passes):
    """seg_eigen_cam.py: get_2d_projection_with_sign_correction(|grads| * activations)."""
    _, activation, gradient = passes["layer2"]
    weighted = np.abs(gradient) * activation
    expected, ratio, top = get_2d_projection(weighted)
    flip = np.abs(expected.min(axis=(1, 2))) > np.abs(expected.max(axis=(1, 2)))
    expected = np.where(flip[:, None, None], -expected, expected)
    atol = (weighted.shape[2] * weighted.shape[3] + weighted.shape[1]) * EPS * top * (1 + ratio)
    margin = np.abs(np.abs(expected.min(axis=(1, 2))) - np.abs(expected.max(axis=(1, 2))))
    assert ratio < 50 and np.all(margin > 2 * atol), "the sign correction would be decided by rounding"
    got = cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "segeigencam")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=atol)


def test_finercam_is_gradcam_with_the_finer_target(model, variables, images):
    finer = gradcam(model, variables, images, TARGETS, method="finercam", normalize=False, upsample=False)
    same = gradcam(model, variables, images, TARGETS, method="gradcam", score="finer", normalize=False, upsample=False)
    plain = gradcam(model, variables, images, TARGETS, method="gradcam", normalize=False, upsample=False)
    np.testing.assert_array_equal(np.asarray(finer), np.asarray(same))
    assert np.abs(np.asarray(finer) - np.asarray(plain)).max() > 0
    with pytest.raises(JaxresError, match="finercam is gradcam with score 'finer'"):
        gradcam(model, variables, images, method="finercam", score="softmax")


def kernel_pca_projection(activation_batch):
    """utils/svd_on_activations.py get_2d_projection_kernel(kernel='sigmoid', gamma=None), with
    sklearn's KernelPCA(n_components=1).fit_transform written out from its source:
    sigmoid_kernel (gamma 1 / n_features, coef0 1), KernelCenterer, the dense eigensolver,
    eigenvector * sqrt(eigenvalue). Also returns max lambda1 / (lambda1 - lambda2), max lambda1."""
    projections, ratios, tops = [], [], []
    for activations in activation_batch:
        reshaped = activations.reshape(activations.shape[0], -1).transpose()
        reshaped = reshaped - reshaped.mean(axis=0)
        kernel = np.tanh(reshaped @ reshaped.T / reshaped.shape[1] + 1)
        centred = kernel - kernel.mean(axis=0)[None, :] - kernel.mean(axis=1)[:, None] + kernel.mean()
        values, vectors = np.linalg.eigh(centred)
        projections.append((vectors[:, -1] * np.sqrt(max(values[-1], 0))).reshape(activations.shape[1:]))
        ratios.append(values[-1] / (values[-1] - values[-2]))
        tops.append(values[-1])
    return np.array(projections), max(ratios), max(tops)


def test_kpca_cam_matches_numpy_up_to_sign(passes):
    _, activation, gradient = passes["layer2"]
    expected, ratio, top = kernel_pca_projection(activation)
    assert ratio < 50, "first eigenvalue nearly repeated: the comparison would be vacuous"
    got = np.asarray(cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "kpca_cam"), np.float64)
    got = got * np.sign(np.sum(got * expected, axis=(1, 2)))[:, None, None]
    positions, channels = np.prod(activation.shape[2:]), activation.shape[1]
    # the kernel's entries: sums of K products; eigh's backward error ~ P eps ||G||; the
    # eigenvector moves by that over the gap, and is scaled by sqrt(lambda1)
    atol = (positions + channels) * EPS * np.sqrt(top) * (1 + ratio)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_kernel_pca_reference_is_sklearns(passes):
    """The reference above against sklearn itself, where it is installed (not in the project's venv)."""
    sklearn = pytest.importorskip("sklearn.decomposition")
    _, activation, _ = passes["layer2"]
    expected, ratio, top = kernel_pca_projection(activation)
    positions, channels = np.prod(activation.shape[2:]), activation.shape[1]
    atol = (positions + channels) * EPS * np.sqrt(top) * (1 + ratio)
    for n, activations in enumerate(activation):
        reshaped = activations.reshape(channels, -1).T
        fitted = sklearn.KernelPCA(n_components=1, kernel="sigmoid", gamma=None).fit_transform(reshaped - reshaped.mean(0))
        fitted = fitted[:, 0].reshape(expected.shape[1:])
        np.testing.assert_allclose(fitted * np.sign(np.sum(fitted * expected[n])), expected[n], rtol=0, atol=atol)


def test_eigencam_and_eigengradcam_match_numpy_up_to_sign(passes):
    _, activation, gradient = passes["layer2"]
    assert_projection_close(cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "eigencam"), activation)
    assert_projection_close(cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), "eigengradcam"), gradient * activation)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "gradcam_elementwise", "hirescam"])
def test_eigen_smooth_is_the_projection_of_the_weighted_activations(passes, method):
    _, activation, gradient = passes["layer2"]
    if method == "gradcam":  # base_cam.py: get_2d_projection(weights[:, :, None, None] * activations)
        weighted = gradient.mean(axis=(2, 3))[:, :, None, None] * activation
    elif method == "layercam":  # layer_cam.py
        weighted = np.maximum(gradient, 0) * activation
    elif method == "hirescam":  # hirescam.py
        weighted = gradient * activation
    else:  # grad_cam_elementwise.py
        weighted = np.maximum(gradient * activation, 0)
    assert_projection_close(cam_methods.cam_from_activation(nhwc(activation), nhwc(gradient), method, eigen_smooth=True), weighted)


def test_eigen_smooth_refused_where_the_library_ignores_it(model, variables, images):
    for method in ("eigencam", "eigengradcam", "segeigencam", "kpca_cam", "fem"):
        with pytest.raises(JaxresError, match=f"eigen_smooth does not apply to {method}"):
            gradcam(model, variables, images, method=method, eigen_smooth=True)


# --------------------------------------------------------------------------- targets and Shapley-CAM


def softmax(logits):
    exponentials = np.exp(logits - logits.max(-1, keepdims=True))
    return exponentials / exponentials.sum(-1, keepdims=True)


def regression_score(logits, classes):
    """A custom target: one score per image that is not a class logit."""
    return jnp.sum(logits[:, :3], axis=-1) - logits[:, 5]


def finer_weighted_target(logits, classes, alpha=1, comparison_categories=(1, 2, 3)):
    """finer_cam.py FinerCAM.forward's targets (target_idx = the class) and
    utils/model_targets.py FinerWeightedTarget, one image at a time."""
    scores = []
    for output, target in zip(logits, classes):
        sorted_indices = np.argsort(np.abs(output - output[target]))
        main, compared = sorted_indices[0], [sorted_indices[i] for i in comparison_categories]
        prob = softmax(output[None])[0]
        weights = [prob[i] for i in compared]
        numerator = sum(w * (output[main] - alpha * output[i]) for w, i in zip(weights, compared))
        scores.append(numerator / (sum(weights) + 1e-9))
    return np.array(scores)


def test_target_scores_match_model_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 10))
    classes = np.array([0, 9, 3, 3, 1])
    p = softmax(logits)
    rows = np.arange(5)
    log_sum = np.log(np.exp(logits).sum(-1))
    expected = {
        "logit": logits[rows, classes],  # ClassifierOutputTarget
        "softmax": p[rows, classes],  # ClassifierOutputSoftmaxTarget
        "rest": logits[rows, classes] - (log_sum - logits[rows, classes]),  # ClassifierOutputReST: logit - cross_entropy
        "binary": np.where(classes == 1, 1, -1) * logits[:, 0],  # BinaryClassifierOutputTarget
        regression_score: logits[:, :3].sum(-1) - logits[:, 5],
        "finer": finer_weighted_target(logits, classes),
    }
    for score, want in expected.items():
        got = cam_methods.target_scores(jnp.asarray(logits, jnp.float32), jnp.asarray(classes), score)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_softmax_gradient_and_hessian_vector_product_closed_forms(model, variables, images, passes):
    """At layer3 the head is max-pool, dense, x 0.125: z = J A + 0.125 b with J linear (it routes
    0.125 W to each channel's argmax), so for S = softmax(z)_c: dS/dA = J^T (p_c (e_c - p)),
    H A = J^T H_z (J A) with J A = z - 0.125 b and H_z = p_c [(e_c - p)(e_c - p)^T - diag(p) + p p^T]."""
    logits, activation, _ = passes["layer3"]
    kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["classifier"]["bias"], np.float64)
    a = activation.transpose(0, 2, 3, 1)
    p = softmax(logits)
    projected = logits - 0.125 * bias  # J A
    gradients, products = [], []
    for n, c in enumerate(TARGETS):
        e = np.eye(10)[c] - p[n]
        hessian = p[n, c] * (np.outer(e, e) - np.diag(p[n]) + np.outer(p[n], p[n]))
        gradients.append(p[n, c] * e)
        products.append(hessian @ projected[n])

    def transpose_jacobian(vectors):  # J^T v: [N, 10] -> [N, h, w, K]
        at_max = a == a.max(axis=(1, 2), keepdims=True)
        share = at_max / at_max.sum(axis=(1, 2), keepdims=True)
        return share * (0.125 * np.asarray(vectors) @ kernel.T)[:, None, None, :]

    inputs = normalize(images)
    _, _, _, gradient = cam_methods.stage_activation_and_gradient(model, variables, inputs, jnp.asarray(TARGETS), "layer3", "softmax")
    expected = transpose_jacobian(gradients)
    np.testing.assert_allclose(np.asarray(gradient), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    product = cam_methods.stage_hessian_vector_product(model, variables, inputs, jnp.asarray(TARGETS), "layer3", "softmax")
    expected = transpose_jacobian(products)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(np.asarray(product), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # shapley_cam.py: weights mean(grads - 0.5 hvp), then base_cam's sum
    raw = gradcam(model, variables, images, TARGETS, method="shapleycam", score="softmax", relu=False, normalize=False, upsample=False)
    weights = (np.asarray(gradient, np.float64) - 0.5 * expected).mean(axis=(1, 2))
    want = base_cam_image(weights, activation)
    np.testing.assert_allclose(np.asarray(raw), want, rtol=0, atol=1e-4 * np.abs(want).max())
    # a logit score: the model after layer3 is piecewise linear, so H A = 0 and Shapley-CAM is Grad-CAM
    plain = [gradcam(model, variables, images, TARGETS, method=m, normalize=False, upsample=False) for m in ("shapleycam", "gradcam")]
    np.testing.assert_allclose(np.asarray(plain[0]), np.asarray(plain[1]), rtol=0, atol=1e-7)


def test_binary_and_custom_targets(images):
    model = CustomResNet(width=WIDTH, num_classes=1)
    variables = random_variables(model, seed=2)

    def raw(**kwargs):
        return np.asarray(gradcam(model, variables, images, relu=False, normalize=False, upsample=False, **kwargs))

    positive, negative = raw(score="binary", targets=1), raw(score="binary", targets=0)
    assert np.abs(positive).max() > 0
    np.testing.assert_allclose(negative, -positive, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(raw(score="binary"), positive)  # default: the positive class
    np.testing.assert_allclose(raw(score=first_output), positive, rtol=0, atol=1e-7)
    with pytest.raises(JaxresError, match="score 'binary' needs a model with one output, CustomResNet has 10"):
        gradcam(CustomResNet(width=WIDTH), random_variables(CustomResNet(width=WIDTH), 0), images, score="binary")
    with pytest.raises(JaxresError, match="unknown score 'probability'"):
        gradcam(model, variables, images, score="probability")


def first_output(logits, classes):
    return logits[:, 0]


# --------------------------------------------------------------------------- gradient-free methods of many passes


@pytest.fixture(scope="module")
def scores_of(model, variables):
    """The model as a black box: images float32[B, 3, H, W] (normalised), a class -> scores."""
    apply = jax.jit(lambda x: model.apply(cam_methods.inference_variables(variables), x, train=False))
    return lambda batch, target: np.asarray(apply(jnp.asarray(batch.transpose(0, 2, 3, 1))))[:, target]


def test_scorecam_matches_numpy(model, variables, images, passes, scores_of):
    _, activation, _ = passes["layer3"]
    inputs = np.asarray(normalize(images))
    expected = score_cam_weights(inputs.transpose(0, 3, 1, 2), activation, TARGETS, scores_of)
    got = cam_methods.scorecam_weights(model, variables, jnp.asarray(inputs), nhwc(activation), jnp.asarray(TARGETS))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * expected.max())
    raw = gradcam(model, variables, images, TARGETS, method="scorecam", relu=False, normalize=False, upsample=False)
    want = base_cam_image(expected, activation)
    np.testing.assert_allclose(np.asarray(raw), want, rtol=0, atol=1e-5 * np.abs(want).max() + sum_bound(expected[:, :, None, None] * activation))


def test_align_corners_matrix_is_upsampling_bilinear_2d():
    maps = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = upsampling_bilinear_align_corners(maps, (32, 32))
    rows, columns = cam_methods.align_corners_matrix(4, 32), cam_methods.align_corners_matrix(5, 32)
    got = np.einsum("Hh,nkhw,Ww->nkHW", rows, maps, columns)
    np.testing.assert_allclose(got, expected, rtol=0, atol=4 * EPS * np.abs(maps).max())


def test_ablation_values_as_the_ablation_layer_writes_them():
    rng = np.random.default_rng(0)
    activation = rng.uniform(0.5, 2.0, (2, 3, 3, 70)).astype(np.float32)  # minimum not 0: the 1e7 branch
    activation[1, 0, 0, 5] = 0.0  # image 1 has minimum 0: channels are zeroed
    got = np.asarray(cam_methods.ablation_values(jnp.asarray(activation)))
    for n in range(2):
        outputs = ablation_layer_outputs(activation[n].transpose(2, 0, 1), np.arange(70))
        expected = outputs[np.arange(70), np.arange(70), 0, 0]
        np.testing.assert_allclose(got[n], expected, rtol=4 * EPS)
    assert got[0, 31] < got[0, 0] < 0 and got[0, 32] == got[0, 0] and np.all(got[1] == 0)


@functools.partial(jax.jit, static_argnums=(0, 2))
def run_with_stage_output(model, variables, layer, inputs, stage_output):
    """Logits of the model whose stage `layer` outputs `stage_output` (a black box here)."""
    forward, zero = cam_methods.stage_forward(model, variables, inputs, layer)
    return forward(stage_output - forward(zero)[1])[0]


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_ablationcam_matches_numpy(model, variables, images, passes, layer):
    logits, activation, _ = passes[layer]
    inputs = normalize(images)
    original = logits[np.arange(len(TARGETS)), TARGETS]
    weights = []
    for n, target in enumerate(TARGETS):  # ablation_cam.py get_cam_weights, one image at a time
        outputs = ablation_layer_outputs(activation[n].astype(np.float32), np.arange(activation.shape[1]))
        # the model with the ablation layer in place of the stage: the image once per ablated channel
        scores = run_with_stage_output(model, variables, layer, jnp.repeat(inputs[n : n + 1], len(outputs), axis=0), nhwc(outputs))
        weights.append((original[n] - np.float32(np.asarray(scores)[:, target])) / original[n])
    expected = np.array(weights)
    forward, _ = cam_methods.stage_forward(model, variables, inputs, layer)
    got = cam_methods.ablationcam_weights(forward, nhwc(activation), jnp.asarray(logits, jnp.float32), jnp.asarray(TARGETS))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_randomcam_weights_are_uniform_in_minus_one_one(model, variables, images, passes):
    _, activation, _ = passes["layer3"]
    key = jax.random.key(3)
    raw = gradcam(model, variables, images, method="randomcam", key=key, relu=False, normalize=False, upsample=False)
    weights = np.asarray(jax.random.uniform(key, activation.shape[:2], jnp.float32, -1.0, 1.0), np.float64)
    assert -1 <= weights.min() and weights.max() <= 1 and weights.min() < -0.5 < 0.5 < weights.max()
    np.testing.assert_allclose(np.asarray(raw), base_cam_image(weights, activation), rtol=0, atol=sum_bound(weights[:, :, None, None] * activation))
    other = gradcam(model, variables, images, method="randomcam", key=jax.random.key(4))
    assert np.abs(np.asarray(other) - np.asarray(gradcam(model, variables, images, method="randomcam", key=key))).max() > 0.1
    with pytest.raises(JaxresError, match="randomcam needs key"):
        gradcam(model, variables, images, method="randomcam")
    with pytest.raises(JaxresError, match="key is for randomcam only, not gradcam"):
        gradcam(model, variables, images, key=key)


# --------------------------------------------------------------------------- aug_smooth


def test_aug_smooth_is_the_mean_of_the_deaugmented_maps(model, variables, images):
    """base_cam.py forward_augmentation_smoothing with tta.Compose([HorizontalFlip(),
    Multiply([0.9, 1, 1.1])]): one forward per (flip, factor), mask flipped back, mean."""
    options = dict(layer="layer3", method="gradcam", score="logit", eigen_smooth=False, relu=True, normalize=True, upsample_to_input=True)
    inputs = np.asarray(normalize(images))
    single = jax.jit(lambda x: cam_lib._post_processed_maps(model, variables, x, None, None, (32, 32), **options))
    cams = []
    for flip in (False, True):  # ttach's product order
        for factor in (0.9, 1.0, 1.1):
            augmented = inputs[:, :, ::-1] * factor if flip else inputs * factor
            cam = np.asarray(single(jnp.asarray(augmented)))
            cams.append(cam[:, :, ::-1] if flip else cam)
    expected = np.mean(np.float32(cams), axis=0)
    got = gradcam(model, variables, images, layer="layer3", aug_smooth=True)
    # the same float32 network on one batch of 6 N images here, on 6 batches of N there
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- batched, jit, grad


NEW_METHODS = ("gradcam_elementwise", "eigengradcam", "segeigencam", "shapleycam", "finercam", "eigencam", "kpca_cam", "scorecam", "ablationcam", "fem",
               "fullgrad")  # fmt: skip


@pytest.mark.parametrize("method", NEW_METHODS)
def test_batch_equals_per_image_under_jit(model, variables, images, method):
    """Raw maps (a principal component's sign is each SVD's own: compared up to sign)."""
    projected = "eigen" in method or method in ("scorecam", "ablationcam")
    options = dict(layer="layer2", method=method, eigen_smooth=method in ("scorecam", "ablationcam"), relu=False, normalize=False, upsample=False)
    together = np.asarray(gradcam(model, variables, images[:3], **options))
    per_image = np.asarray(jax.jit(jax.vmap(lambda x: gradcam(model, variables, x[None], **options)[0]))(images[:3].astype(np.float32)))
    if projected:
        per_image = per_image * np.sign(np.sum(together * per_image, axis=(1, 2)))[:, None, None]
    np.testing.assert_allclose(per_image, together, rtol=0, atol=1e-5 * np.abs(together).max())


@pytest.mark.parametrize("method", ["eigencam", "kpca_cam", "scorecam", "ablationcam", "shapleycam", "fullgrad"])
def test_differentiable_with_respect_to_images(model, variables, images, method):
    weights = jnp.asarray(np.random.default_rng(1).random((2, 32, 32)), jnp.float32)
    loss = lambda x: jnp.sum(gradcam(model, variables, x, layer="layer2", method=method, score="softmax") * weights)  # noqa: E731
    gradient = np.asarray(jax.jit(jax.grad(loss))(images[:2].astype(np.float32)))
    assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0


def test_first_right_singular_vector_derivative_is_the_svds_where_that_is_defined():
    """On a full-rank matrix with distinct singular values JAX's SVD derivative holds; the
    custom one (which also holds on the rank-deficient centred matrices) must equal it."""
    rng = np.random.default_rng(0)
    rows, direction = (jnp.asarray(rng.normal(size=(12, 5)), jnp.float32) for _ in range(2))
    vector, derivative = jax.jvp(cam_methods.first_right_singular_vector, (rows,), (direction,))
    _, reference = jax.jvp(lambda r: jnp.linalg.svd(r, full_matrices=False)[2][0], (rows,), (direction,))
    singular = np.linalg.svd(np.asarray(rows, np.float64), compute_uv=False)
    # a 5-vector from sums of 12 terms, conditioned by the gaps: (12 + 5) eps s1^2 / min gap of s^2
    atol = 17 * EPS * singular[0] ** 2 / np.min(singular[0] ** 2 - singular[1:] ** 2) * np.abs(np.asarray(reference)).max()
    np.testing.assert_allclose(np.asarray(derivative), np.asarray(reference), rtol=0, atol=atol)
    assert np.isclose(np.linalg.norm(np.asarray(vector)), 1.0, atol=1e-6)


def test_drop_and_increase_in_confidence_as_cam_mult_image(model, variables, images):
    """metrics/cam_mult_image.py: DropInConfidence = max(-change, 0), IncreaseInConfidence =
    float32(change > 0), change = score(input * cam) - score(input) (`confidence_change`)."""
    from jaxres.cam_metrics import confidence_change, drop_in_confidence, increase_in_confidence

    cams = gradcam(model, variables, images)
    flat = np.ones((len(images), 32, 32), np.float32) * np.array([0.2, 1.0, 1.0, 0.5], np.float32)[:, None, None]
    for maps in (cams, flat):
        change = np.asarray(confidence_change(model, variables, images, maps))
        np.testing.assert_array_equal(np.asarray(drop_in_confidence(model, variables, images, maps)), np.maximum(-change, 0))
        np.testing.assert_array_equal(np.asarray(increase_in_confidence(model, variables, images, maps)), np.float32(change > 0))
    assert np.all(np.asarray(drop_in_confidence(model, variables, images, flat))[1:3] == 0)  # an all-ones map changes nothing


# --------------------------------------------------------------------------- FullGrad


def scale_cam_image(maps, size=None):
    """utils/image.py scale_cam_image on float [M, h, w]: per map x - min, / (1e-7 + max), then
    cv2.resize INTER_LINEAR to `size` (torch's bilinear with align_corners=False, no antialias:
    the same half-pixel rule, up or down; cv2 copies a map of the same size)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    maps = np.float32(maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True)))
    if size is None or tuple(size) == maps.shape[1:]:
        return maps
    return F.interpolate(torch.from_numpy(maps)[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def scale_accross_batch_and_channels(tensor, size):
    """utils/image.py: scale_cam_image on every (image, channel) map."""
    count, channels = tensor.shape[:2]
    return scale_cam_image(tensor.reshape(count * channels, *tensor.shape[2:]), size).reshape(count, channels, *size)


def fullgrad_reference(twin, inputs_nchw, targets, eigen_smooth=False):
    """fullgrad_cam.py FullGrad on the PyTorch twin, as the library runs it: its layers
    (find_layer_predicate_recursive: Conv2d and BatchNorm2d with a bias, in module order),
    ActivationsAndGradients' tensor hooks (gradients prepended as they arrive), the input's
    gradient of sum_n logit[n, target_n], get_bias_data, compute_cam_per_layer and
    aggregate_multi_layers. Returns (the sum before the last scale_cam_image, the final map)."""
    import torch

    def find(module):
        found = []
        for layer in module._modules.values():
            if type(layer) in (torch.nn.Conv2d, torch.nn.BatchNorm2d) and layer.bias is not None:
                found.append(layer)
            found.extend(find(layer))
        return found

    layers, gradients = find(twin), []

    def save_gradient(module, inputs, output):
        def store(grad):
            gradients.insert(0, grad.detach().numpy())

        output.register_hook(store)

    handles = [layer.register_forward_hook(save_gradient) for layer in layers]
    input_tensor = torch.tensor(inputs_nchw, requires_grad=True)
    outputs = twin(input_tensor)
    sum(output[target] for target, output in zip(targets, outputs)).backward()
    for handle in handles:
        handle.remove()
    bias_data = [
        (-(layer.running_mean * layer.weight / torch.sqrt(layer.running_var + layer.eps)) + layer.bias).detach().numpy()
        if isinstance(layer, torch.nn.BatchNorm2d) else layer.bias.detach().numpy()
        for layer in layers
    ]  # fmt: skip
    assert len(bias_data) == len(gradients) > 0
    size = inputs_nchw.shape[2:]
    per_layer = [scale_accross_batch_and_channels(np.abs(input_tensor.grad.numpy() * inputs_nchw), size)]
    for bias, grads in zip(bias_data, gradients):
        per_layer.append(scale_accross_batch_and_channels(np.abs(bias[None, :, None, None] * grads), size).sum(1)[:, None])
    per_layer = np.concatenate(per_layer, axis=1)
    if eigen_smooth:
        small = scale_accross_batch_and_channels(per_layer, (size[0] // 8, size[1] // 8))
        projection, ratio, _ = get_2d_projection(small.astype(np.float64))
        assert ratio < 50, "first singular value nearly repeated: the sign and the map would be ill-defined"
        per_layer = scale_accross_batch_and_channels(np.float32(projection)[:, None], size)
    total = per_layer.sum(axis=1)
    return total, scale_cam_image(total)


@pytest.fixture(scope="module")
def torch_twin(model, variables):
    pytest.importorskip("torch")
    from benchmarks.torch_reference import CustomResNet as TorchResNet
    from jaxres.convert import flax_to_torch

    twin = TorchResNet(width=0.25).float().eval()
    twin.load_state_dict(flax_to_torch(variables, model, tensors=True), strict=True)
    return twin


def test_fullgrad_matches_pytorch_grad_cam_on_the_twin(model, variables, images, torch_twin):
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)
    raw_expected, expected = fullgrad_reference(torch_twin, inputs, TARGETS)
    raw = np.asarray(gradcam(model, variables, images, TARGETS, method="fullgrad", relu=False, normalize=False, upsample=False))
    # a sum of 3 + 8 maps in [0, 1]; each the scaled |b * g| of a float32 network's gradients
    np.testing.assert_allclose(raw, raw_expected, rtol=0, atol=1e-4)
    cams = np.asarray(gradcam(model, variables, images, TARGETS, method="fullgrad"))
    np.testing.assert_allclose(cams, expected, rtol=0, atol=1e-5)
    # it ignores the layer (fullgrad_cam.py: "target_layers is ignored")
    np.testing.assert_array_equal(np.asarray(gradcam(model, variables, images, TARGETS, layer="layer1", method="fullgrad")), cams)


def test_fullgrad_eigen_smooth_matches_up_to_sign(model, variables, images, torch_twin):
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)
    _, expected = fullgrad_reference(torch_twin, inputs, TARGETS, eigen_smooth=True)
    cams = np.asarray(gradcam(model, variables, images, TARGETS, method="fullgrad", eigen_smooth=True))
    # a flipped component scales to 1 - map: compare each image with the closer orientation
    flipped = np.abs(cams - (1 - expected)).max(axis=(1, 2)) < np.abs(cams - expected).max(axis=(1, 2))
    np.testing.assert_allclose(np.where(flipped[:, None, None], 1 - cams, cams), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- meta-methods: RefineCAM and SESS


def test_refinecam_matches_pytorch_grad_cam(model, variables, images, passes):
    """refine_cam.py with GradCAMPlusPlus: each layer's BaseCAM map (grad_cam_plusplus.py's
    weights, ReLU, scale_cam_image to the input size, aggregate_multi_layers), their product
    (its clip-and-rescale loop rebinds its loop variable: a no-op), scale_cam_image."""
    from jaxres.cam_meta import refinecam

    per_layer = []
    for layer in ("layer2", "layer3"):
        _, activation, gradient = passes[layer]
        grads_power_2 = gradient**2
        sum_activations = activation.sum(axis=(2, 3))[:, :, None, None]
        aij = grads_power_2 / (2 * grads_power_2 + sum_activations * grads_power_2 * gradient + 0.000001)
        aij = np.where(gradient != 0, aij, 0)
        weights = (np.maximum(gradient, 0) * aij).sum(axis=(2, 3))
        cam = scale_cam_image(np.maximum(base_cam_image(weights, activation), 0), (32, 32))
        per_layer.append(scale_cam_image(np.maximum(cam, 0)))
    expected = scale_cam_image(np.prod(np.array(per_layer), axis=0))
    assert np.all(expected.max(axis=(1, 2)) > 0.99) and np.abs(expected - per_layer[1]).max() > 0.1
    got = np.asarray(refinecam(model, variables, images, TARGETS, layers=("layer2", "layer3")))
    # one normalisation without epsilon here, two with 1e-7 there, per layer (tests/test_gradcam.py)
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)
    with pytest.raises(JaxresError, match="at least one layer"):
        refinecam(model, variables, images, layers=())


def sess_reference(inputs_nchw, targets, scores_of, base, scales, window_size, step_size, pre_filter_ratio=0.0, theta=0.0, pool="mean",
                   smooth=True, batch_size=32):  # fmt: skip
    """sess.py SESS.forward, written out from its source, one image at a time: torchvision's
    resize (F.interpolate bilinear, antialias), sliding_window, get_scores (softmax, target,
    clipped at 0), the pre-filter, paste_cam (cv2.resize INTER_LINEAR: F.interpolate without
    antialias), _CAMFusion, cv2.GaussianBlur((11, 11), 5) with BORDER_REFLECT_101, and
    scale_cam_image. scores_of(patches NCHW, target) -> softmax probabilities; base(patches
    NCHW, targets) -> maps [B, w, w]."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    def window_starts(length):
        starts = []
        for start in range(0, length, step_size):
            if start + window_size >= length:
                starts.append(max(length - window_size, 0))
                break
            starts.append(start)
        return starts

    offsets = np.arange(11) - 5
    kernel = np.exp(-(offsets**2) / (2 * 5.0**2))
    kernel = kernel / kernel.sum()
    cams = []
    for image, target in zip(inputs_nchw, targets):
        height, width = image.shape[1:]
        patches, coordinates = [], []
        for scale in scales:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = scale, int(scale * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
            scaled = F.interpolate(torch.tensor(image)[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
            scaled = scaled.numpy()
            for y1 in window_starts(new_h):
                for x1 in window_starts(new_w):
                    patches.append(scaled[:, :, y1 : y1 + window_size, x1 : x1 + window_size])
                    coordinates.append((x1, y1, new_w, new_h))
        scores = np.maximum(np.concatenate([scores_of(np.concatenate(patches[i : i + batch_size]), target)
                                            for i in range(0, len(patches), batch_size)]), 0)  # fmt: skip
        order = np.argsort(scores, kind="stable")[int(len(scores) * pre_filter_ratio) :]
        max_score = scores[order[-1]]
        weights = scores[order] / max_score if max_score > 0 else np.ones(len(order), np.float32)
        total, counts = np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch_cams = base(np.concatenate([patches[i] for i in indices]), [target] * len(indices))
            for cam, weight, index in zip(batch_cams, weights[start : start + batch_size], indices):
                x1, y1, scaled_width, scaled_height = coordinates[index]
                full_cam = np.zeros((scaled_height, scaled_width), np.float32)
                full_cam[y1 : y1 + cam.shape[0], x1 : x1 + cam.shape[1]] = cam * weight
                resized = F.interpolate(torch.from_numpy(full_cam)[None, None], size=(height, width), mode="bilinear", align_corners=False)
                resized = resized[0, 0].numpy()
                if pool == "max":
                    np.maximum(total, resized, out=total)
                else:
                    mask = resized > theta
                    total[mask] += resized[mask]
                    counts += mask
        cam = total if pool == "max" else np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
        if smooth:
            padded = np.pad(cam, 5, mode="reflect")  # BORDER_REFLECT_101
            cam = sum(w * padded[:, i : i + width] for i, w in enumerate(kernel))
            cam = sum(w * cam[i : i + height, :] for i, w in enumerate(kernel))
        cams.append(cam)
    return scale_cam_image(np.float32(cams))


@pytest.mark.parametrize(
    "crop, options",
    [
        ((32, 32), dict(num_scales=2)),  # the defaults: scales 32, 41; window 32, step 32 (1 + 4 patches)
        ((32, 40), dict(scales=[32, 43], step_size=12, pre_filter_ratio=0.5, pool="max", smooth=False)),  # 43 x int(53.75)
        ((40, 32), dict(scales=[38], window_size=24, theta=0.3, layer="layer2", method="layercam")),  # int(47.5) x 38
    ],
)
def test_sess_matches_pytorch_grad_cam(model, variables, crop, options):
    from jaxres.cam_meta import sess, sess_scales
    from jaxres.data.shapes import make_shapes

    images = make_shapes(num_train=1, num_test=2, image_size=40, seed=3).test.images[:, : crop[0], : crop[1]]  # crops: any aspect
    targets = np.array([3, 7])  # classes whose random-network Grad-CAM maps are not all below 0
    layer, method = options.get("layer", "layer3"), options.get("method", "gradcam")
    apply = jax.jit(lambda x: jax.nn.softmax(model.apply(cam_methods.inference_variables(variables), x, train=False)))
    post = dict(layer=layer, method=method, score="logit", eigen_smooth=False, relu=True, normalize=True, upsample_to_input=True)
    window = options.get("window_size", min(crop))
    maps = jax.jit(lambda x, t: cam_lib._post_processed_maps(model, variables, x, t, None, (window, window), **post))

    def scores_of(patches, target):
        return np.asarray(apply(jnp.asarray(patches.transpose(0, 2, 3, 1))))[:, target]

    def base(patches, classes):
        return np.asarray(maps(jnp.asarray(patches.transpose(0, 2, 3, 1)), jnp.asarray(classes)))

    reference_options = {k: v for k, v in options.items() if k in ("pre_filter_ratio", "theta", "pool", "smooth")}
    scales = options.get("scales") or sess_scales(window, options.get("num_scales", 12))
    inputs = np.asarray(normalize(images)).transpose(0, 3, 1, 2)
    expected = sess_reference(inputs, targets, scores_of, base, scales, window, options.get("step_size", window), **reference_options)
    assert np.all(expected.max(axis=(1, 2)) > 0.99)
    got = np.asarray(sess(model, variables, images, targets, **options))
    # the same float32 maps and scores, fused in another order; the normalisations' 1e-7
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)


def test_sess_runs_the_model_once_a_patch(model, variables):
    """SESS's patch scores come from the logits of the forward pass its Grad-CAM takes, where the
    library (and jaxres before) ran the model a second time for them: at the last stage, whose
    gradient crosses no convolution, the whole program has the convolutions of one forward pass."""
    from jaxres.cam_meta import sess
    from jaxres.data.shapes import make_shapes
    from jaxres.loops import xla_convolutions

    images = make_shapes(num_train=1, num_test=2, seed=3).test.images
    forward = xla_convolutions(jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(normalize(images)))
    program = jax.make_jaxpr(lambda x: sess(model, variables, x, np.array([3, 7]), layer="layer3", num_scales=2))(images)
    assert forward == 8  # the custom ResNet's eight 3x3 convolutions
    assert xla_convolutions(program) == forward


def test_sess_windows_and_errors(model, variables, images):
    """sess.py sliding_window's cases (tests/test_sess.py) and its ValueErrors, as JaxresError."""
    from jaxres.cam_meta import sess, sess_plan, sess_scales, window_starts

    assert [(x, y) for y in window_starts(288, 224, 224) for x in window_starts(288, 224, 224)] == [(0, 0), (64, 0), (0, 64), (64, 64)]
    assert window_starts(448, 112, 224) == [0, 112, 224] and window_starts(224, 224, 224) == [0]
    assert sess_scales(224, 3) == [224, 288, 352] and sess_scales(32, 3) == [32, 41, 50]
    assert sess_plan(32, 40, scales=[41])[1][0][:2] == (41, 51)  # torchvision: the shorter side to 41, the longer int(41 * 40 / 32)
    for kwargs, message in [(dict(pool="median"), "unknown pool"), (dict(pre_filter_ratio=1.0), "pre_filter_ratio"),
                            (dict(num_scales=0), "num_scales"), (dict(scales=[16]), "at least the window")]:  # fmt: skip
        with pytest.raises(JaxresError, match=message):
            sess(model, variables, images, **kwargs)
