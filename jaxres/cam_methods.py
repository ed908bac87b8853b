"""The math of every CAM method: target scores, the passes through the model, each method's map.

    raw = raw_map(model, variables, inputs, classes, key, layer="layer3", method="scorecam")

`jaxres.gradcam` is the public face (checks, post-processing, smoothing, plots, command line)
and imports this module, never the reverse. Every formula and constant is the one in
pytorch-grad-cam 1.5.7's source, cited beside it (file and name); the library works on NCHW
NumPy arrays one image at a time, these functions on NHWC device arrays, a batch at a time.

Groups:
  gradient-based  gradcam, gradcam++, hirescam, xgradcam, layercam, gradcam_elementwise,
                  eigengradcam, shapleycam, fullgrad (all the biases' gradients; no layer)
  gradient-free   eigencam, kpca_cam, scorecam, ablationcam, fem, randomcam (a sanity baseline)
  targets         what is explained: a class logit, its softmax probability, a binary
                  output, ReST, or any function (logits, classes) -> one score per image
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxres.errors import JaxresError

GRADIENT_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "eigengradcam", "segeigencam",
                    "shapleycam", "finercam", "fullgrad")  # fmt: skip
GRADIENT_FREE_METHODS = ("eigencam", "kpca_cam", "scorecam", "ablationcam", "fem", "randomcam")
ALL_METHODS = GRADIENT_METHODS + GRADIENT_FREE_METHODS
# Methods whose map is a function of A and dS/dA alone (`cam_from_activation`).
ACTIVATION_GRADIENT_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "eigengradcam", "segeigencam",
                               "eigencam", "kpca_cam", "fem")  # fmt: skip
# Where pytorch-grad-cam 1.5.7 honours eigen_smooth: BaseCAM.get_cam_image (the methods that
# give channel weights) and the overrides of hirescam.py, layer_cam.py, grad_cam_elementwise.py.
# eigen_cam.py, eigen_grad_cam.py, seg_eigen_cam.py, kpca_cam.py and fem.py override get_cam_image and
# ignore it; FinerCAM passes it on to its base method (GradCAM).
EIGEN_SMOOTH_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "shapleycam", "finercam",
                        "scorecam", "ablationcam", "randomcam", "fullgrad")  # fmt: skip
SCORES = ("logit", "softmax", "binary", "rest", "finer")

# The denominators' epsilons, each as pytorch-grad-cam 1.5.7 spells it in that method's file
# (they differ, and Grad-CAM++ is sensitive to its own: with XGrad-CAM's 1e-7 its normalised
# maps move by about 2e-2, see `cam_from_activation`).
GRADCAM_PLUS_PLUS_EPSILON = 1e-6  # pytorch_grad_cam/grad_cam_plusplus.py: eps = 0.000001, in alpha
XGRADCAM_EPSILON = 1e-7  # pytorch_grad_cam/xgrad_cam.py: eps = 1e-7, in sum_ab A_kab + eps
SCORECAM_EPSILON = 1e-8  # pytorch_grad_cam/score_cam.py: (upsampled - mins) / (maxs - mins + 1e-8)
SCORECAM_BATCH_SIZE = 16  # score_cam.py: BATCH_SIZE = 16 (masked images per forward pass)
ABLATIONCAM_BATCH_SIZE = 32  # ablation_cam.py: batch_size: int = 32 (ablated channels per pass)
ABLATION_VALUE = 1e7  # ablation_layer.py: ABLATION_VALUE = 1e7, when the activations' minimum is not 0
FEM_K = 2  # fem.py: k=2, the k-sigma threshold mean + k std
SHAPLEY_HESSIAN_FACTOR = 0.5  # shapley_cam.py: weight = grads - 0.5 * hvp
KPCA_COEF0 = 1.0  # kpca_cam.py: KernelPCA(kernel='sigmoid', gamma=None), sklearn's coef0=1 and gamma 1 / n_features
FINER_ALPHA = 1.0  # finer_cam.py FinerCAM.forward: alpha: float = 1
FINER_COMPARISON_CATEGORIES = (1, 2, 3)  # finer_cam.py: comparison_categories = [1, 2, 3], ranks by similarity
FINER_EPSILON = 1e-9  # utils/model_targets.py FinerWeightedTarget: numerator / (denominator + 1e-9)
SCALE_EPSILON = 1e-7  # utils/image.py scale_cam_image: (x - min) / (1e-7 + max), per map (FullGrad's every map)
FULLGRAD_EIGEN_SMOOTH_FACTOR = 8  # fullgrad_cam.py: eigen_smooth at (target_size[0] // 8, target_size[1] // 8)


# --------------------------------------------------------------------------- targets


def target_scores(logits: jax.Array, classes: jax.Array, score="logit") -> jax.Array:
    """The score S explained for each image.  float32[N, C] x int32[N] -> float32[N].

    score: "logit"   logits[n, c]                 (utils/model_targets.py ClassifierOutputTarget)
           "softmax" softmax(logits)[n, c]        (ClassifierOutputSoftmaxTarget)
           "binary"  +logits[n, 0] for c = 1, -logits[n, 0] for c = 0, for a model with one
                     output                       (BinaryClassifierOutputTarget: output * sign)
           "rest"    logits[n, c] - cross_entropy(logits[n], c) = 2 logits[n, c] - logsumexp
                                                  (ClassifierOutputReST, one image at a time)
           "finer"   sum_j p_j (z_c - alpha z_j) / (sum_j p_j + eps) over the classes j ranked
                     1, 2, 3 by |z_j - z_c| (the most similar to c), p = softmax(z), alpha =
                     FINER_ALPHA, eps = FINER_EPSILON (FinerWeightedTarget, as finer_cam.py
                     builds it; c itself is rank 0 unless another logit ties with it)
           or a function (logits float32[N, C], classes int32[N]) -> float32[N]: a regression
           output, a margin, any custom target (hashable: a module-level function, not a
           new lambda per call, or every call compiles again).
    """
    if callable(score):
        values = score(logits, classes)
        if jnp.shape(values) != logits.shape[:1]:
            raise JaxresError(f"the score function must give one score per image, shape ({logits.shape[0]},), got {jnp.shape(values)}")
        return values
    if score == "binary":
        return jnp.where(classes == 1, 1.0, -1.0) * logits[:, 0]
    chosen = jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]
    if score == "logit":
        return chosen
    if score == "softmax":
        return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), classes[:, None], axis=-1)[:, 0]
    if score == "rest":
        return 2 * chosen - jax.nn.logsumexp(logits, axis=-1)
    if score == "finer":
        similar = jnp.argsort(jnp.abs(logits - chosen[:, None]), axis=-1)[:, jnp.asarray(FINER_COMPARISON_CATEGORIES)]
        weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), similar, axis=-1)
        differences = chosen[:, None] - FINER_ALPHA * jnp.take_along_axis(logits, similar, axis=-1)
        return jnp.sum(weights * differences, axis=-1) / (jnp.sum(weights, axis=-1) + FINER_EPSILON)
    raise JaxresError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}, or pass a function (logits, classes) -> scores")


# --------------------------------------------------------------------------- the passes


def inference_variables(variables) -> dict:
    """Only what inference needs: params and (if any) batch_stats. JaxresError without params."""
    if not hasattr(variables, "keys") or "params" not in variables:
        raise JaxresError("variables have no 'params' collection")
    return {name: variables[name] for name in ("params", "batch_stats") if name in variables}


def stage_forward(model, variables, inputs: jax.Array, layer: str):
    """(forward, zero): forward(perturbation) -> (logits, A) runs the model in inference mode on
    `inputs` with `perturbation` added to stage `layer`'s output A (through the model's
    `perturbations` collection), and reads A (before the addition) with
    `capture_intermediates`; zero is a zero perturbation, float[N, h, w, K]. A function of the
    perturbation, so jax.vjp / jax.jvp of it differentiate with respect to the stage's output,
    and forward(A' - A) runs the rest of the model on A' instead of A (Ablation-CAM)."""
    variables = inference_variables(variables)
    _, shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["perturbations"]), variables, inputs)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes["perturbations"]))

    def forward(perturbation):
        logits, state = model.apply(
            {**variables, "perturbations": {**zeros, layer: {"output": perturbation}}},
            inputs,
            train=False,
            capture_intermediates=lambda module, method: module.path == (layer,) and method == "__call__",
            mutable=["intermediates"],
        )
        return logits, state["intermediates"][layer]["__call__"][0]

    return forward, zeros[layer]["output"]


def stage_activation_and_gradient(model, variables, inputs: jax.Array, targets: jax.Array | None, layer: str, score="logit"):
    """One forward and one backward pass, in inference mode.

    inputs: float32[N, H, W, 3] (normalised); targets: int32[N] or None (the predicted
    classes); score: what is explained (`target_scores`). Returns (logits float32[N,
    classes], targets int32[N], activation float32[N, h, w, K], gradient float32[N, h, w, K])
    where activation is the output of stage `layer` and gradient is d S_n / d activation[n]
    (the gradient of the sum over the batch: in inference mode the images do not interact).
    """
    forward, zero = stage_forward(model, variables, inputs, layer)
    logits, backward, activation = jax.vjp(forward, zero, has_aux=True)
    if targets is None:
        targets = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, score_backward = jax.vjp(lambda values: target_scores(values, targets, score), logits)
    (cotangent,) = score_backward(jnp.ones(logits.shape[:1], logits.dtype))
    (gradient,) = backward(cotangent)
    return logits, targets, activation.astype(jnp.float32), gradient.astype(jnp.float32)


def stage_hessian_vector_product(model, variables, inputs, targets: jax.Array, layer: str, score="logit"):
    """H A, the Hessian of sum_n S_n with respect to stage `layer`'s output A, times A:
    float32[N, h, w, K] (shapley_cam.py's hvp, torch.autograd.grad(grads, activations,
    grad_outputs=activations)): as the library, reverse over reverse, the gradient of
    <dS/dA, A> (H is symmetric), not a jvp of the gradient, which a model whose convolutions
    are a custom_vjp (oneDNN's, `jaxres.onednn`) could not take. Zero where the model after
    the stage is piecewise linear in A (ReLU, max-pool, dense) and S is a logit; not zero for
    a softmax score."""
    forward, zero = stage_forward(model, variables, inputs, layer)
    activation = forward(zero)[1]

    def gradient(perturbation):
        return jax.grad(lambda p: jnp.sum(target_scores(forward(p)[0], targets, score)))(perturbation)

    return jax.grad(lambda p: jnp.vdot(gradient(p), activation))(zero).astype(jnp.float32)


# --------------------------------------------------------------------------- maps from A (and G)


def principal_component_projection(maps: jax.Array) -> jax.Array:
    """The projection of each image's centred maps on their first principal component.
    float[N, h, w, K] -> float32[N, h, w].

    As utils/svd_on_activations.py's get_2d_projection: NaN -> 0; the h*w x K matrix of
    positions by channels, minus its mean over the positions; its SVD; projection =
    centred @ VT[0]. The sign is the SVD's (the first right singular vector's): NumPy's and
    this one may differ, so compare up to sign. Differentiable wherever the first singular
    value is simple (`first_right_singular_vector`), also when the centred matrix is rank
    deficient, as it always is (its rows sum to zero).
    """
    maps = jnp.where(jnp.isnan(maps), 0.0, maps).astype(jnp.float32)
    count, height, width, channels = maps.shape
    rows = maps.reshape(count, height * width, channels)
    rows = rows - jnp.mean(rows, axis=1, keepdims=True)
    return jnp.einsum("npk,nk->np", rows, jax.vmap(first_right_singular_vector)(rows)).reshape(count, height, width)


def kernel_principal_component_projection(maps: jax.Array) -> jax.Array:
    """Each image's positions on the first component of a kernel PCA of its centred maps.
    float[N, h, w, K] -> float32[N, h, w].

    As utils/svd_on_activations.py's get_2d_projection_kernel with kpca_cam.py's defaults
    (sklearn's KernelPCA(n_components=1, kernel='sigmoid', gamma=None).fit_transform), in
    JAX: NaN -> 0; X = the h*w x K matrix minus its mean over the positions; the sigmoid
    kernel G = tanh(X X^T / K + KPCA_COEF0) (gamma None is 1 / n_features); G centred as
    sklearn's KernelCenterer (minus row and column means, plus the overall mean); its top
    eigenvector u (eigh, the dense solver sklearn uses for so few samples) times
    sqrt(max(lambda, 0)). The sign is the eigensolver's (sklearn's svd_flip makes the
    largest |entry| positive in some versions): compare up to sign.
    """
    maps = jnp.where(jnp.isnan(maps), 0.0, maps).astype(jnp.float32)
    count, height, width, channels = maps.shape
    rows = maps.reshape(count, height * width, channels)
    rows = rows - jnp.mean(rows, axis=1, keepdims=True)
    gram = jnp.tanh(jnp.einsum("npk,nqk->npq", rows, rows) / channels + KPCA_COEF0)
    gram = gram - jnp.mean(gram, axis=1, keepdims=True) - jnp.mean(gram, axis=2, keepdims=True) + jnp.mean(gram, axis=(1, 2), keepdims=True)
    values, vectors = jnp.linalg.eigh(gram)
    projection = vectors[:, :, -1] * jnp.sqrt(jnp.maximum(values[:, -1:], 0.0))
    return projection.reshape(count, height, width)


@jax.custom_jvp
def first_right_singular_vector(rows: jax.Array) -> jax.Array:
    """VT[0] of the thin SVD of rows float32[m, K] -> float32[K] (the top eigenvector of
    C = rows^T rows), with the derivative of that eigenvector alone: dv = (s1^2 I - C)^+ dC v.
    JAX's own SVD derivative divides by the differences of *all* singular values, NaN when
    several are 0 (a rank-deficient matrix); this one needs only s1 > s2."""
    return jnp.linalg.svd(rows, full_matrices=False)[2][0]


@first_right_singular_vector.defjvp
def _first_right_singular_vector_jvp(primals, tangents):
    (rows,), (rows_dot,) = primals, tangents
    _, singular, right = jnp.linalg.svd(rows, full_matrices=False)
    vector = right[0]
    covariance_dot_vector = rows_dot.T @ (rows @ vector) + rows.T @ (rows_dot @ vector)  # dC v
    coefficients = right @ covariance_dot_vector
    first = jnp.arange(singular.shape[0]) == 0
    gaps = jnp.where(first, 1.0, singular[0] ** 2 - singular**2)
    in_span = right.T @ jnp.where(first, 0.0, coefficients / gaps)
    outside = (covariance_dot_vector - right.T @ coefficients) / singular[0] ** 2  # C is 0 there
    return vector, in_span + outside


def _combine(weighted: jax.Array, eigen_smooth: bool) -> jax.Array:
    """BaseCAM.get_cam_image: the channel sum of the weighted activations, or with eigen_smooth
    their first principal component (`principal_component_projection`)."""
    return principal_component_projection(weighted) if eigen_smooth else jnp.sum(weighted, axis=-1)


def cam_from_weights(activation: jax.Array, weights: jax.Array, eigen_smooth: bool = False) -> jax.Array:
    """sum_k w_k A_k (base_cam.py get_cam_image), or the projection of w A with eigen_smooth.
    float32[N, h, w, K] x float32[N, K] -> float32[N, h, w]."""
    if eigen_smooth:
        return principal_component_projection(weights[:, None, None, :] * activation)
    return jnp.einsum("nhwk,nk->nhw", activation, weights)


def cam_from_activation(activation: jax.Array, gradient: jax.Array, method: str = "gradcam", eigen_smooth: bool = False) -> jax.Array:
    """The raw map (before ReLU) of `method` from A and G = dS/dA.  float32[N,h,w,K] x2 -> [N,h,w].

    With A_k the k-th channel of the stage's output, G_k its gradient, sums over the
    positions (i, j) of the h x w map and Z = h * w:

    gradcam   (Selvaraju et al. 2017):  w_k = (1/Z) sum_ij G_kij;        cam = sum_k w_k A_k
    gradcam++ (Chattopadhay et al. 2018, eq. 19), the closed form for an exponential score:
              alpha_kij = G^2 / (2 G^2 + (sum_ab A_kab) G^3 + eps_pp), 0 where G = 0;
              w_k = sum_ij alpha_kij ReLU(G_kij);                        cam = sum_k w_k A_k
    hirescam  (Draelos & Carin 2020):   cam = sum_k G_k * A_k  (elementwise, no averaging)
    xgradcam  (Fu et al. 2020):         w_k = sum_ij G_kij A_kij / (sum_ab A_kab + eps_x);
                                        cam = sum_k w_k A_k
    layercam  (Jiang et al. 2021):      cam = sum_k ReLU(G_k) * A_k
    gradcam_elementwise:                cam = sum_k ReLU(G_k * A_k)  (grad_cam_elementwise.py)
    eigengradcam: the first principal component of G * A            (eigen_grad_cam.py)
    segeigencam (Chung & Ying 2025): the first principal component of |G| * A, negated
              where its |min| > |max| (seg_eigen_cam.py,
              get_2d_projection_with_sign_correction): its sign is defined
    eigencam  (Muhammad & Yeasin 2020): the first principal component of A  (eigen_cam.py)
    kpca_cam  (Karmani et al. 2024): the first kernel principal component of A
              (`kernel_principal_component_projection`; kpca_cam.py)
    fem       (Fuad et al. 2020):       w_k = mean_ij [A_kij > mean_ij A_k + k std_ij A_k],
                                        k = FEM_K = 2, std the population one (np.std);
                                        cam = sum_k w_k A_k          (fem.py)

    eigen_smooth (where the library has it, EIGEN_SMOOTH_METHODS) replaces the channel sum by
    the first principal component of the summed terms (`principal_component_projection`).
    eps_pp = GRADCAM_PLUS_PLUS_EPSILON = 1e-6 and eps_x = XGRADCAM_EPSILON = 1e-7. Each
    formula and constant is the one in pytorch-grad-cam 1.5.7's source (grad_cam.py,
    grad_cam_plusplus.py, hirescam.py, xgrad_cam.py, layer_cam.py and the files named above;
    its Grad-CAM++ zeroes alpha where the gradient, not the activation, is 0, as here), so on
    the same A and G the maps agree to float32 rounding. Grad-CAM++ is sensitive to eps_pp:
    where G^2 is near 1e-6 (small gradients, deep stages) eps_pp is a large part of the
    denominator, and 1e-7 instead changes normalised maps by a few 1e-2. The final ReLU is
    applied by the caller (all the papers do, and so does pytorch-grad-cam).
    """
    check_method(method, ACTIVATION_GRADIENT_METHODS, eigen_smooth)
    spatial = (1, 2)
    if method == "gradcam":
        return cam_from_weights(activation, jnp.mean(gradient, axis=spatial), eigen_smooth)
    if method == "gradcam++":
        squared = gradient**2
        cubed = squared * gradient
        activation_sum = jnp.sum(activation, axis=spatial, keepdims=True)
        alpha = squared / (2 * squared + activation_sum * cubed + GRADCAM_PLUS_PLUS_EPSILON)
        alpha = jnp.where(gradient != 0, alpha, 0.0)
        return cam_from_weights(activation, jnp.sum(alpha * jax.nn.relu(gradient), axis=spatial), eigen_smooth)
    if method == "xgradcam":
        activation_sum = jnp.sum(activation, axis=spatial, keepdims=True)
        weights = jnp.sum(gradient * activation / (activation_sum + XGRADCAM_EPSILON), axis=spatial)
        return cam_from_weights(activation, weights, eigen_smooth)
    if method == "hirescam":
        return _combine(gradient * activation, eigen_smooth)
    if method == "layercam":
        return _combine(jax.nn.relu(gradient) * activation, eigen_smooth)
    if method == "gradcam_elementwise":
        return _combine(jax.nn.relu(gradient * activation), eigen_smooth)
    if method == "eigengradcam":
        return principal_component_projection(gradient * activation)
    if method == "segeigencam":
        projection = principal_component_projection(jnp.abs(gradient) * activation)
        flip = jnp.abs(jnp.min(projection, axis=(1, 2), keepdims=True)) > jnp.abs(jnp.max(projection, axis=(1, 2), keepdims=True))
        return jnp.where(flip, -projection, projection)
    if method == "eigencam":
        return principal_component_projection(activation)
    if method == "kpca_cam":
        return kernel_principal_component_projection(activation)
    threshold = jnp.mean(activation, axis=spatial, keepdims=True) + FEM_K * jnp.std(activation, axis=spatial, keepdims=True)
    return cam_from_weights(activation, jnp.mean(activation > threshold, axis=spatial).astype(activation.dtype))  # fem


def check_method(method: str, allowed=ALL_METHODS, eigen_smooth: bool = False) -> None:
    """Raise JaxresError unless `method` is one of `allowed` and, with `eigen_smooth`, one of
    EIGEN_SMOOTH_METHODS (where pytorch-grad-cam applies it); returns None."""
    if method not in allowed:
        raise JaxresError(f"unknown CAM method {method!r}; choose one of {', '.join(allowed)}")
    if eigen_smooth and method not in EIGEN_SMOOTH_METHODS:
        raise JaxresError(
            f"eigen_smooth does not apply to {method} (pytorch-grad-cam ignores it there: its map is already "
            f"{'a principal component' if method.startswith('eigen') else 'its own channel sum'}); "
            f"it applies to {', '.join(EIGEN_SMOOTH_METHODS)}"
        )


# --------------------------------------------------------------------------- post-processing


def min_max_normalize(maps: jax.Array) -> jax.Array:
    """Per map, (x - min) / (max - min).  float[N, H, W] -> float32[N, H, W] in [0, 1].

    A flat map (max == min) gives zeros, never NaN, and so does its gradient.
    """
    maps = jnp.asarray(maps, jnp.float32)
    low = jnp.min(maps, axis=(1, 2), keepdims=True)
    span = jnp.max(maps, axis=(1, 2), keepdims=True) - low
    flat = span <= 0
    return jnp.where(flat, 0.0, (maps - low) / jnp.where(flat, 1.0, span))


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of float[N, h, w] maps to [N, H, W] with `jax.image.resize`.

    Pixel centres sit at half-pixel offsets and the two-tap (triangle) weights that fall
    outside the map are dropped and the rest renormalised, which is the same as
    PyTorch's edge clamping: the result equals
    `F.interpolate(mode="bilinear", align_corners=False)` to float rounding, for integer
    and non-integer factors alike (tested; antialias is off, as PyTorch's default, so
    this holds for downsampling too).
    """
    count = maps.shape[0]
    return jax.image.resize(maps, (count, *size), method="bilinear", antialias=False)



# --------------------------------------------------------------------------- methods of many forward passes


@functools.lru_cache(maxsize=32)
def align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
    """float32[size_out, size_in]: 1-D bilinear interpolation with align_corners=True, as
    torch.nn.UpsamplingBilinear2d (score_cam.py's upsampling): output i samples the input at
    i (size_in - 1) / (size_out - 1)."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    source = np.arange(size_out) * scale
    low = np.clip(np.floor(source).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    fraction = source - low
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (np.arange(size_out), low), 1 - fraction)
    np.add.at(matrix, (np.arange(size_out), high), fraction)
    return matrix.astype(np.float32)


def scorecam_weights(model, variables, inputs, activation, classes, score="logit", batch_size: int = SCORECAM_BATCH_SIZE):
    """Score-CAM's channel weights (Wang et al. 2020; score_cam.py get_cam_weights).
    inputs float32[N, H, W, 3] (normalised), activation float32[N, h, w, K], classes int32[N]
    -> float32[N, K].

    Each channel, upsampled to H x W (bilinear, align_corners=True, as UpsamplingBilinear2d)
    and min-max normalised, (u - min) / (max - min + SCORECAM_EPSILON), masks the input
    (input * mask, the normalised input as the library's input_tensor); w = softmax over the
    channels of the masked inputs' scores. The N K forward passes run on the device,
    `batch_size` channels (N batch_size images) a pass, with lax.map."""
    height, width = inputs.shape[1:3]
    rows = jnp.asarray(align_corners_matrix(activation.shape[1], height))
    columns = jnp.asarray(align_corners_matrix(activation.shape[2], width))
    upsampled = jnp.einsum("Hh,nhwk,Ww->knHW", rows, activation, columns)
    low = jnp.min(upsampled, axis=(2, 3), keepdims=True)
    high = jnp.max(upsampled, axis=(2, 3), keepdims=True)
    masks = (upsampled - low) / (high - low + SCORECAM_EPSILON)
    variables = inference_variables(variables)

    def scores_of_channel(mask):  # float32[N, H, W] -> float32[N]
        return target_scores(model.apply(variables, inputs * mask[..., None], train=False), classes, score)

    scores = jax.lax.map(scores_of_channel, masks, batch_size=batch_size)  # [K, N]
    return jax.nn.softmax(scores.T.astype(jnp.float32), axis=-1)


def ablation_values(activation: jax.Array, batch_size: int = ABLATIONCAM_BATCH_SIZE) -> jax.Array:
    """What ablation_layer.py's AblationLayer writes into each ablated channel: float32[N, K].

    0 where an image's activations have minimum 0 (the common case after a ReLU). Otherwise
    the library writes torch.min(output) - ABLATION_VALUE into the batch's i-th copy *after*
    the copies before it were written, so the i-th channel of each pass of `batch_size`
    gets min - (i + 1) 1e7 (computed here as the library's running subtraction in float32).
    """
    low = jnp.min(activation, axis=(1, 2, 3)).astype(jnp.float32)
    position = jnp.arange(activation.shape[-1]) % batch_size

    def step(value, _):
        value = value - jnp.float32(ABLATION_VALUE)
        return value, value

    _, running = jax.lax.scan(step, low, None, length=batch_size)  # [batch_size, N]
    return jnp.where((low == 0)[:, None], 0.0, running[position].T)


def ablationcam_weights(forward, activation, logits, classes, score="logit", batch_size: int = ABLATIONCAM_BATCH_SIZE):
    """Ablation-CAM's channel weights (Desai & Ramaswamy 2020; ablation_cam.py, all channels:
    ratio_channels_to_ablate = 1.0). forward: `stage_forward`'s; activation float32[N, h, w,
    K]; logits float32[N, C]; classes int32[N] -> float32[N, K]: w_k = (S - S_k) / S, with S
    the score and S_k the score with channel k of the stage's output replaced by
    `ablation_values` (through the perturbation A' - A; the model before the stage runs again,
    as in the library). The N K forward passes run on the device, `batch_size` channels (N
    batch_size images) a pass, with lax.map."""
    original = target_scores(logits, classes, score)
    values = ablation_values(activation, batch_size)  # [N, K]

    def scores_without_channel(channel):  # int32[] -> float32[N]
        chosen = jnp.arange(activation.shape[-1]) == channel
        ablated = jnp.where(chosen, values[:, channel][:, None, None, None], activation)
        return target_scores(forward(ablated - activation)[0], classes, score)

    ablated_scores = jax.lax.map(scores_without_channel, jnp.arange(activation.shape[-1]), batch_size=batch_size).T
    return ((original[:, None] - ablated_scores) / original[:, None]).astype(jnp.float32)


def _bias_kind(module) -> str | None:
    """"batch_norm" for a BatchNorm (params bias, batch_stats mean and var, an epsilon), "conv" for
    a convolution with a bias (a 4-D kernel), None otherwise: fullgrad_cam.py's layers,
    torch.nn.Conv2d and BatchNorm2d with a bias (Dense, GroupNorm, LayerNorm are not among them)."""
    tree = module.variables
    params, stats = tree.get("params", {}), tree.get("batch_stats", {})

    def leaf(collection, name, ndim):
        return hasattr(collection, "get") and getattr(collection.get(name), "ndim", None) == ndim

    if leaf(params, "bias", 1) and leaf(stats, "mean", 1) and leaf(stats, "var", 1) and hasattr(module, "epsilon"):
        return "batch_norm"
    return "conv" if leaf(params, "bias", 1) and leaf(params, "kernel", 4) else None


def bias_forward(model, variables, inputs: jax.Array):
    """(forward, zeros): forward(inputs, perturbations) -> (logits, biases) runs the model in
    inference mode with perturbations[path] added to the output of every bias layer
    (`_bias_kind`; found with flax's nn.intercept_methods, no change to the model), and gives
    biases[path], float32[C], each layer's bias as fullgrad_cam.py's get_bias_data: a
    convolution's own, and a BatchNorm's effective one, bias - running_mean * scale /
    sqrt(running_var + eps) (scale 1 where the layer has none). zeros: the zero perturbations,
    {path: float[N, h, w, C]}; the gradient with respect to them is each layer's output gradient."""
    variables = inference_variables(variables)

    def forward(x, perturbations):
        biases, outputs = {}, {}

        def intercept(next_fun, args, kwargs, context):
            output = next_fun(*args, **kwargs)
            kind = _bias_kind(context.module) if context.method_name == "__call__" else None
            if kind is None:
                return output
            module, path = context.module, context.module.path
            params = module.variables["params"]
            bias = jnp.asarray(params["bias"], jnp.float32)
            if kind == "batch_norm":
                stats = module.variables["batch_stats"]
                scale = jnp.asarray(params.get("scale", 1.0), jnp.float32)
                bias = bias - stats["mean"] * scale / jnp.sqrt(stats["var"] + module.epsilon)
            biases[path], outputs[path] = bias, output
            return output if perturbations is None else output + perturbations[path]

        with nn.intercept_methods(intercept):
            logits = model.apply(variables, x, train=False)
        return logits, biases, outputs

    shapes = jax.eval_shape(lambda x: forward(x, None)[2], inputs)
    zeros = {path: jnp.zeros(shape.shape, shape.dtype) for path, shape in shapes.items()}
    return (lambda x, perturbations: forward(x, perturbations)[:2]), zeros


def _scale_maps(maps: jax.Array) -> jax.Array:
    """utils/image.py scale_cam_image on every map, as scale_accross_batch_and_channels: per (n,
    c), (x - min) / (SCALE_EPSILON + max of that).  float[N, h, w, C] -> same."""
    shifted = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
    return shifted / (SCALE_EPSILON + jnp.max(shifted, axis=(1, 2), keepdims=True))


def _resize_channels(maps: jax.Array, size) -> jax.Array:
    """cv2.resize INTER_LINEAR of every channel (`upsample`).  float[N, h, w, C] -> [N, *size, C]."""
    return jax.image.resize(maps, (maps.shape[0], *size, maps.shape[-1]), method="bilinear", antialias=False)


def fullgrad_map(model, variables, inputs, classes, score="logit", eigen_smooth: bool = False) -> tuple[jax.Array, jax.Array]:
    """FullGrad (Srinivas & Fleuret 2019; pytorch-grad-cam 1.5.7 fullgrad_cam.py), which ignores
    the target layer: the map of all the model's biases and of the input.
    inputs float32[N, H, W, 3] (normalised); classes int32[N] or None -> (map float32[N, H, W],
    the logits of its forward pass float[N, classes]).

    One forward and one backward pass (`bias_forward`) give the input gradient g_x = dS/dx and,
    for every convolution bias and BatchNorm bias b_l, the gradient g_l of S with respect to
    that layer's output. Then, as compute_cam_per_layer: |x * g_x| per channel (3 maps) and,
    per layer, sum_c of |b_l[c] * g_l[..., c]|, each map scaled by scale_cam_image
    ((m - min) / (SCALE_EPSILON + max), SCALE_EPSILON = 1e-7) at its own resolution and resized
    to H x W (bilinear, cv2's; resized after the channel sum here, which is the same linear
    map); the 3 + L maps are summed. With eigen_smooth, the 3 + L maps scaled and resized to
    (H // 8, W // 8) (FULLGRAD_EIGEN_SMOOTH_FACTOR), their first principal component
    (`principal_component_projection`, sign the SVD's: compare up to sign), scaled and resized
    to H x W. The library's last scale_cam_image is the caller's normalisation. The library
    pairs the i-th layer module with the i-th gradient its hooks record (module order against
    call order); here each layer's bias meets its own gradient, by module path.
    """
    forward, zeros = bias_forward(model, variables, inputs)
    logits, backward, biases = jax.vjp(forward, inputs, zeros, has_aux=True)
    if classes is None:
        classes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, score_backward = jax.vjp(lambda values: target_scores(values, classes, score), logits)
    input_gradient, gradients = backward(score_backward(jnp.ones(logits.shape[:1], logits.dtype))[0])
    size = inputs.shape[1:3]
    maps = [_scale_maps(jnp.abs(inputs * input_gradient).astype(jnp.float32))]
    for path, gradient in gradients.items():
        layer = jnp.sum(_scale_maps(jnp.abs(biases[path] * gradient.astype(jnp.float32))), axis=-1, keepdims=True)
        maps.append(_resize_channels(layer, size))
    maps = jnp.concatenate(maps, axis=-1)  # [N, H, W, 3 + L]
    if not eigen_smooth:
        return jnp.sum(maps, axis=-1), logits
    small = tuple(side // FULLGRAD_EIGEN_SMOOTH_FACTOR for side in size)
    projection = principal_component_projection(_resize_channels(_scale_maps(maps), small))
    return _resize_channels(_scale_maps(projection[..., None]), size)[..., 0], logits


def raw_map(model, variables, inputs, classes, key=None, *, layer: str, method: str, score="logit", eigen_smooth: bool = False):
    """The map of any method before ReLU, at the stage's resolution: float32[N, h, w] (fullgrad:
    at the input's, [N, H, W]; it ignores `layer`).

    inputs float32[N, H, W, 3] (normalised); classes int32[N] or None (the predicted ones);
    key: a PRNG key (randomcam only). Gradient-based methods take one forward and one
    backward pass (shapleycam a gradient of it too), gradient-free ones one forward pass
    (scorecam and ablationcam N K more, batched on the device)."""
    return raw_map_and_logits(model, variables, inputs, classes, key, layer=layer, method=method, score=score, eigen_smooth=eigen_smooth)[0]


def raw_map_and_logits(model, variables, inputs, classes, key=None, *, layer: str, method: str, score="logit", eigen_smooth: bool = False):
    """`raw_map` and the logits of the model's forward pass on `inputs` that the map took:
    (float32[N, h, w], float[N, classes]), so that a caller that needs both (SESS's patch
    scores) runs the model once, not once more for the logits."""
    check_method(method, ALL_METHODS, eigen_smooth)
    if method in GRADIENT_FREE_METHODS:
        forward, zero = stage_forward(model, variables, inputs, layer)
        logits, activation = forward(zero)
        activation = activation.astype(jnp.float32)
        if classes is None:
            classes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if method in ("eigencam", "kpca_cam", "fem"):
            return cam_from_activation(activation, activation, method), logits
        if method == "randomcam":  # random_cam.py: np.random.uniform(-1, 1, size=(N, K))
            weights = jax.random.uniform(key, activation.shape[:1] + activation.shape[-1:], jnp.float32, -1.0, 1.0)
        elif method == "scorecam":
            weights = scorecam_weights(model, variables, inputs, activation, classes, score)
        else:
            weights = ablationcam_weights(forward, activation, logits, classes, score)
        return cam_from_weights(activation, weights, eigen_smooth), logits
    if method == "fullgrad":
        return fullgrad_map(model, variables, inputs, classes, score, eigen_smooth)
    if method == "finercam":  # finer_cam.py: FinerCAM = its base method, GradCAM, with FinerWeightedTarget
        method, score = "gradcam", "finer"
    logits, classes, activation, gradient = stage_activation_and_gradient(model, variables, inputs, classes, layer, score)
    if method != "shapleycam":
        return cam_from_activation(activation, gradient, method, eigen_smooth), logits
    hessian_product = stage_hessian_vector_product(model, variables, inputs, classes, layer, score)
    weights = jnp.mean(gradient - SHAPLEY_HESSIAN_FACTOR * hessian_product, axis=(1, 2))
    return cam_from_weights(activation, weights, eigen_smooth), logits
