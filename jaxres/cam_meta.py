"""Meta-methods over any CAM method of `jaxres.gradcam`: RefineCAM and SESS.

    cams = refinecam(model, variables, images, layers=("layer2", "layer3"))       # float32[N, H, W]
    cams = sess(model, variables, images, method="gradcam", num_scales=4)

Both from pytorch-grad-cam 1.5.7 (refine_cam.py, sess.py; constants cited beside them), on NHWC
device arrays, a batch at a time: RefineCAM multiplies one method's maps at several layers,
SESS fuses one method's maps of many patches of the image at several scales. Every map comes
from `jaxres.gradcam` (its checks, its post-processing: ReLU, bilinear resize, min-max
normalisation, once and without epsilon, as documented there). This module imports
`jaxres.gradcam`, never the reverse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import gradcam as cam_lib
from jaxres.augment import normalize as normalize_images
from jaxres.cam_methods import inference_variables, min_max_normalize, target_scores
from jaxres.errors import JaxresError

REFINECAM_METHOD = "gradcam++"  # refine_cam.py: base_method=GradCAMPlusPlus
SESS_METHOD = "gradcam"  # sess.py: base_method=GradCAM
SESS_NUM_SCALES = 12  # sess.py: num_scales: int = 12
SESS_SCALE_STEP_RATIO = 2.0 / 7.0  # sess.py: scale_step_ratio = 2.0 / 7.0 (224, 288, ... for 224 x 224)
SESS_BATCH_SIZE = 32  # sess.py: batch_size = 32 patches a forward pass
SESS_BLUR_SIZE, SESS_BLUR_SIGMA = 11, 5.0  # sess.py: cv2.GaussianBlur(cam, (11, 11), 5.0, 0)
SESS_POOLS = ("mean", "max")


# --------------------------------------------------------------------------- RefineCAM


def refinecam(model, variables, images, targets=None, layers=None, method: str = REFINECAM_METHOD, *, score="logit",
              eigen_smooth: bool = False, key=None) -> jax.Array:  # fmt: skip
    """RefineCAM (pytorch-grad-cam 1.5.7 refine_cam.py): the product over `layers` of `method`'s
    maps, each in [0, 1] at the input size (`gradcam` with its defaults: ReLU, upsampled,
    normalised), min-max normalised again.  -> float32[N, H, W].

    layers: stages of `model.STAGES` (default: all of them); method: any of
    `gradcam.ALL_METHODS` (default gradcam++, the library's); targets, score, eigen_smooth,
    key: as in `gradcam` (aug_smooth is not among RefineCAM's options: its forward takes
    eigen_smooth only). The library's loop that is meant to clip and rescale each layer's map
    rebinds its loop variable and changes nothing; each map is in [0, 1] already, so the
    product is of the normalised maps, as here. Usable under jax.jit and jax.grad (each map is
    `gradcam`'s, jitted). Raises JaxresError as `gradcam`, and for no layers.
    """
    layers = tuple(getattr(model, "STAGES", ())) if layers is None else (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers:
        raise JaxresError("refinecam needs at least one layer: name stages of the model, e.g. layers=('layer2', 'layer3')")
    maps = [cam_lib.gradcam(model, variables, images, targets, layer, method, score=score, eigen_smooth=eigen_smooth, key=key)
            for layer in layers]  # fmt: skip
    return min_max_normalize(functools.reduce(jnp.multiply, maps))


# --------------------------------------------------------------------------- SESS


def window_starts(length: int, step: int, window: int) -> list[int]:
    """sess.py window_starts: 0, step, 2 step, ...; the window that would cross the end is moved
    back to end there (length - window), and is the last."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def sess_scales(window: int, num_scales: int = SESS_NUM_SCALES, ratio: float = SESS_SCALE_STEP_RATIO) -> list[int]:
    """sess.py get_scales' default: window + round(window * ratio) * i, i < num_scales."""
    step = int(round(window * ratio))
    return [window + step * i for i in range(num_scales)]


def resized_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """torchvision's resize(image, scale) output size: the shorter side becomes `scale`, the
    longer int(scale * long / short) (its _compute_resized_output_size)."""
    if width <= height:
        return int(scale * height / width), scale
    return scale, int(scale * width / height)


@functools.lru_cache(maxsize=64)
def linear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """float32[size_out, size_in]: 1-D bilinear resizing with half-pixel centres and edge
    clamping (cv2.resize INTER_LINEAR, torch's align_corners=False), no antialiasing:
    output i samples the input at max((i + 0.5) size_in / size_out - 0.5, 0)."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    fraction = np.where(low >= size_in - 1, 0.0, source - low)
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (np.arange(size_out), low), 1 - fraction)
    np.add.at(matrix, (np.arange(size_out), high), fraction)
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=64)
def gaussian_blur_matrix(size: int, ksize: int = SESS_BLUR_SIZE, sigma: float = SESS_BLUR_SIGMA) -> np.ndarray:
    """float32[size, size]: cv2.GaussianBlur along one axis (kernel exp(-(i - (ksize - 1) / 2)^2
    / (2 sigma^2)) / its sum, cv2.getGaussianKernel's; border BORDER_REFLECT_101, cv2's default:
    ...cb|abc...). Rows of the matrix are the output pixels."""
    offsets = np.arange(ksize) - (ksize - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    matrix = np.zeros((size, size), np.float64)
    for row in range(size):
        for tap, offset in zip(kernel, offsets.astype(int)):
            column = row + offset
            if size > 1:  # reflect-101 (repeatedly, for a kernel wider than the map)
                period = 2 * (size - 1)
                column = column % period
                column = period - column if column >= size else column
            else:
                column = 0
            matrix[row, column] += tap
    return matrix.astype(np.float32)


def sess_plan(height: int, width: int, scales=None, num_scales: int = SESS_NUM_SCALES, scale_step_ratio: float = SESS_SCALE_STEP_RATIO,
              window_size: int | None = None, step_size: int | None = None) -> tuple:  # fmt: skip
    """The patches sess.py collect_patches takes, as a hashable plan: (window, ((scaled height,
    scaled width, ((y1, x1), ...)), ...)), scales in order, windows row by row (its
    sliding_window). Raises JaxresError where the library raises ValueError."""
    window = min(height, width) if window_size is None else int(window_size)
    step = window if step_size is None else int(step_size)
    if num_scales < 1:
        raise JaxresError(f"num_scales must be at least 1, got {num_scales}")
    if window < 1 or step < 1 or window > min(height, width):
        raise JaxresError(f"window_size and step_size must be positive and the window at most the image's shorter side {min(height, width)}")
    scales = sess_scales(window, num_scales, scale_step_ratio) if scales is None else [int(s) for s in scales]
    plan = []
    for scale in scales:
        if scale < window:
            raise JaxresError(f"every scale must be at least the window size {window}, got {scale}")
        scaled_height, scaled_width = resized_size(height, width, scale)
        corners = tuple((y, x) for y in window_starts(scaled_height, step, window) for x in window_starts(scaled_width, step, window))
        plan.append((scaled_height, scaled_width, corners))
    return window, tuple(plan)


@functools.partial(jax.jit, static_argnames=("model", "layer", "method", "score", "eigen_smooth", "plan", "pre_filter_ratio", "theta", "pool",
                                             "smooth", "use_softmax_scores", "batch_size"))  # fmt: skip
def _sess(model, variables, images, targets, key, *, layer, method, score, eigen_smooth, plan, pre_filter_ratio, theta, pool, smooth,
          use_softmax_scores, batch_size):  # fmt: skip
    inputs = normalize_images(images)
    count, height, width, channels = inputs.shape
    window, scales = plan
    if targets is None:  # sess.py get_target: the image's own highest-scoring class
        targets = jnp.argmax(model.apply(inference_variables(variables), inputs, train=False), axis=-1).astype(jnp.int32)
    patches, rows, columns = [], [], []
    for scaled_height, scaled_width, corners in scales:
        scaled = jax.image.resize(inputs, (count, scaled_height, scaled_width, channels), method="bilinear")  # always upsampling
        down_rows, down_columns = linear_resize_matrix(scaled_height, height), linear_resize_matrix(scaled_width, width)
        for y, x in corners:
            patches.append(scaled[:, y : y + window, x : x + window])
            rows.append(down_rows[:, y : y + window])  # the pasted map's zeros elsewhere contribute nothing
            columns.append(down_columns[:, x : x + window])
    patches = jnp.stack(patches)  # [P, N, window, window, 3]
    options = dict(layer=layer, method=method, score=score, eigen_smooth=eigen_smooth, relu=True, normalize=True, upsample_to_input=True)

    def patch_maps_and_scores(patch):  # float32[N, window, window, 3] -> ([N, window, window], [N])
        # the scores from the logits of the map's own forward pass: one forward pass a patch, not two
        maps, logits = cam_lib._post_processed_maps_and_logits(model, variables, patch, targets, key, (window, window), **options)
        scores = target_scores(jax.nn.softmax(logits, axis=-1) if use_softmax_scores else logits, targets, score)
        return maps, jnp.maximum(scores.astype(jnp.float32), 0.0)  # sess.py: negative scores can't be weights

    maps, scores = jax.lax.map(patch_maps_and_scores, patches, batch_size=batch_size)  # [P, N, w, w], [P, N]
    total = scores.shape[0]
    rank = jnp.argsort(jnp.argsort(scores, axis=0, stable=True), axis=0, stable=True)  # ascending, as np.argsort
    kept = rank >= int(total * pre_filter_ratio)
    best = jnp.max(scores, axis=0)
    weights = jnp.where(best > 0, scores / jnp.where(best > 0, best, 1.0), 1.0)
    pasted = jnp.einsum("pHh,pnhw,pWw->pnHW", jnp.asarray(np.stack(rows)), maps * weights[..., None, None], jnp.asarray(np.stack(columns)))
    if pool == "max":
        fused = jnp.max(jnp.where(kept[..., None, None], pasted, 0.0), axis=0)
    else:  # the spatial weighted average over the patches that cover each pixel (above theta)
        counted = kept[..., None, None] & (pasted > theta)
        sums, counts = jnp.sum(jnp.where(counted, pasted, 0.0), axis=0), jnp.sum(counted, axis=0)
        fused = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), 0.0)
    if smooth:
        fused = jnp.einsum("Hh,nhw,Ww->nHW", jnp.asarray(gaussian_blur_matrix(height)), fused, jnp.asarray(gaussian_blur_matrix(width)))
    return min_max_normalize(fused)


def sess(model, variables, images, targets=None, layer: str = "layer3", method: str = SESS_METHOD, *, scales=None,
         num_scales: int = SESS_NUM_SCALES, scale_step_ratio: float = SESS_SCALE_STEP_RATIO, window_size: int | None = None,
         step_size: int | None = None, pre_filter_ratio: float = 0.0, theta: float = 0.0, pool: str = "mean", smooth: bool = True,
         use_softmax_scores: bool = True, score="logit", eigen_smooth: bool = False, key=None,
         batch_size: int = SESS_BATCH_SIZE) -> jax.Array:  # fmt: skip
    """SESS, Saliency Enhancing with Scaling and Sliding (Tursun et al. 2022; pytorch-grad-cam
    1.5.7 sess.py), over any method of `gradcam.ALL_METHODS` (default gradcam, the library's).
    -> float32[N, H, W] in [0, 1].

    As forward_single_image, for every image at once: the image (normalised) is resized
    (bilinear; torchvision's resize: the shorter side to each scale, default `sess_scales`:
    window + round(window * 2/7) i for i < 12) and a window_size square window (default the
    shorter side) slides over each scale by step_size (default the window; the last window of
    a row or column moved back inside, `window_starts`). Each patch's score is the target
    class's softmax probability (use_softmax_scores; else `score` of the logits), clipped at
    0; the 100 pre_filter_ratio % lowest-scoring patches are dropped (np.argsort's order; ties
    broken by patch order here); each patch's map (`method` at `layer`, `gradcam`'s
    post-processing at the window's size, for the image's target) is multiplied by its score
    over the best score (1 if that is 0), pasted at its place in its scale, and resized to H x
    W (cv2 INTER_LINEAR, `linear_resize_matrix`); pool "mean" averages, at each pixel, the
    patches whose value there is above theta ("max": their maximum); smooth applies
    cv2.GaussianBlur (11 x 11, sigma 5, reflect-101 border; `gaussian_blur_matrix`); last the
    min-max normalisation (jaxres's, without the library's 1e-7).

    The P patches of all N images run through the model on the device, batch_size patches (N
    batch_size images) a step of lax.map: one forward pass for the scores and the method's
    passes for the maps, where the library loops over images and batches of 32 patches.
    targets, score, eigen_smooth, key: as in `gradcam` (aug_smooth is not one of SESS's
    options). Jitted, cached per (model, layer, method, plan, options). Raises JaxresError as
    `gradcam`, for an unknown pool, pre_filter_ratio outside [0, 1), num_scales < 1, a scale
    below the window, a window larger than the image's shorter side.
    """
    cam_lib._check_layer(model, layer)
    cam_lib._check_method(method, eigen_smooth)
    cam_lib.check_images(images)
    cam_lib.check_variables(model, variables)
    if pool not in SESS_POOLS:
        raise JaxresError(f"unknown pool {pool!r}; choose one of {', '.join(SESS_POOLS)}")
    if not 0.0 <= pre_filter_ratio < 1.0:
        raise JaxresError(f"pre_filter_ratio must be in [0, 1), got {pre_filter_ratio}")
    if (method == "randomcam") != (key is not None):
        raise JaxresError("randomcam needs key=jax.random.key(seed)" if key is None else f"key is for randomcam only, not {method}")
    height, width = map(int, np.shape(images)[1:3])
    plan = sess_plan(height, width, scales, num_scales, scale_step_ratio, window_size, step_size)
    cam_lib._check_map_size(model, (plan[0], plan[0]), layer, True)
    targets = cam_lib.prepare_targets(targets, np.shape(images)[0], model.num_classes)
    return _sess(model, variables, images, targets, key, layer=layer, method=method, score=score, eigen_smooth=bool(eigen_smooth),
                 plan=plan, pre_filter_ratio=float(pre_filter_ratio), theta=float(theta), pool=pool, smooth=bool(smooth),
                 use_softmax_scores=bool(use_softmax_scores), batch_size=int(batch_size))  # fmt: skip
