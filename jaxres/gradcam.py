"""Class activation maps (Grad-CAM and relatives) as pure JAX functions, and their plots.

    cams = gradcam(model, variables, images)                 # float32[N, H, W] in [0, 1]
    cams = gradcam(model, variables, images, targets=3, layer="layer2", method="layercam")
    cams = gradcam(model, variables, images, method="scorecam", score="softmax", aug_smooth=True)
    figure = plot_cams(images, cams, true_labels, pred_labels, class_names)

How it works: one forward pass in inference mode (BatchNorm uses its running
statistics) reads the chosen stage's output A (`capture_intermediates`) and the logits,
and one backward pass gives dS/dA, the gradient of the target logits S (pre-softmax)
with respect to that output, through the model's `perturbations` collection (a zero
added to the stage's output: its gradient is the gradient of the output). The gradient
of the *sum* over the batch of each image's target logit is every image's own gradient,
since in inference mode the images do not interact. No hooks, no global state: the
whole computation is one jitted function of (variables, images, targets), cached per
(model, layer, method, flags), which runs under `jax.jit` and `jax.vmap` and is
differentiable with respect to the images (a CAM can be part of a loss). The methods'
formulas, the passes and the target scores are in `jaxres.cam_methods` (every method of
pytorch-grad-cam 1.5.7 that jaxres has, each citing its source file); this module checks
the arguments, post-processes (ReLU, upsampling, normalisation, aug_smooth) and plots.

Also here: `overlay` and `plot_cams` (the course library's image / heatmap / overlay
view) and the command line `python -m jaxres.gradcam --workdir RUN ...`. Scores of the
maps (pointing game, deletion / insertion, confidence change, ROAD, ARCC) are in
`jaxres.cam_metrics`; the meta-methods over any method (RefineCAM, SESS) in `jaxres.cam_meta`.
"""

from __future__ import annotations

import functools
import sys
import textwrap
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import cam_methods, models
from jaxres.augment import normalize as normalize_images
from jaxres.cam_methods import (  # noqa: F401  (re-exported: jaxres.gradcam is where users import the CAM names from)
    ALL_METHODS,
    GRADCAM_PLUS_PLUS_EPSILON,
    SCORES,
    XGRADCAM_EPSILON,
    cam_from_activation,
    inference_variables,
    min_max_normalize,
    stage_activation_and_gradient,
    upsample,
)
from jaxres.errors import JaxresError

# The five methods benchmarks/localisation.py compares (and tests/test_gradcam.py sweeps); `gradcam` takes
# every one of ALL_METHODS (the formulas and the passes are in jaxres.cam_methods).
METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
AUGMENTATION_FACTORS = (0.9, 1.0, 1.1)  # base_cam.py: tta.Multiply(factors=[0.9, 1, 1.1]), with tta.HorizontalFlip()
# The most images one figure of `python -m jaxres.gradcam` shows (a row of three panels each, 2.2
# inches tall: 32 rows are a 660 x 7,000 pixel PNG); --skip pages through more.
MAX_FIGURE_IMAGES = 32
_TITLE_CHARACTERS_PER_LINE = 64  # plot_cams wraps longer titles: its figure is 6.6 inches wide


# --------------------------------------------------------------------------- checks (also used by jaxres.cam_metrics)


def _check_layer(model, layer: str) -> None:
    stages = tuple(getattr(model, "STAGES", ()))
    if layer not in stages:
        raise JaxresError(f"unknown layer {layer!r} for {type(model).__name__}; choose one of {', '.join(stages)}")


def _check_method(method: str, eigen_smooth: bool = False) -> None:
    cam_methods.check_method(method, ALL_METHODS, eigen_smooth)


def check_images(images, stacklevel: int = 3) -> None:
    """Raises JaxresError unless `images` is an array (NumPy or JAX, not a list) shaped
    [N, H, W, 3]; warns for concrete images on another scale than [0, 255]: float images whose
    values all lie in [0, 1] (pixels scaled to [0, 1], which jaxres would normalise as nearly
    black images) and images with values above 255 (16-bit pixels, say, which it would see as
    glaring); traced images are not looked at. `stacklevel` as in `warnings.warn`, counted from
    here: 3 blames the caller of the public function."""
    if not hasattr(images, "dtype"):
        raise JaxresError(
            f"images must be an array (NumPy or JAX) of [N, H, W, 3] pixel values, got a {type(images).__name__}; "
            "stack them first: np.stack(images)"
        )
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise JaxresError(f"images must be [N, H, W, 3] pixel values (uint8 or float in [0, 255]), got shape {shape}")
    if not (_is_concrete(images) and images.size) or images.dtype == np.uint8:
        return
    largest = float(images.max())  # NumPy stays on the host, jax on its device
    if jnp.issubdtype(images.dtype, jnp.floating) and largest <= 1.0:
        warnings.warn(
            "float images with values in [0, 1]: jaxres expects pixel values in [0, 255] (uint8, or float "
            "on that scale) and normalises them as in training; multiply by 255 first",
            UserWarning,
            stacklevel=stacklevel,
        )
    elif largest > 255.0:
        warnings.warn(
            f"{images.dtype} images with values above 255 (the largest is {largest:g}): jaxres expects pixel values "
            "in [0, 255] (uint8, or float on that scale) and normalises them as in training; scale 16-bit images "
            "to 8 bits first (divide by 257)",
            UserWarning,
            stacklevel=stacklevel,
        )


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def prepare_targets(targets, count: int, num_classes: int):
    """None | int | ints[N] -> None or int32[N], checked where the values are known.

    Raises JaxresError for non-integer targets, a shape other than () or (count,), and
    (concrete values only) a class outside [0, num_classes).
    """
    if targets is None:
        return None
    if _is_concrete(targets):
        values = np.asarray(targets)
        if values.size == 0 and values.ndim:
            raise JaxresError(f"targets is empty: give None (the predicted classes), an int, or {count} ints (one per image)")
        if not np.issubdtype(values.dtype, np.integer):
            raise JaxresError(f"targets must be class indices (integers), got dtype {values.dtype}")
        if values.ndim == 0:
            values = np.full((count,), int(values))
        if values.shape != (count,):
            raise JaxresError(f"targets must be None, an int or {count} ints (one per image), got shape {values.shape}")
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise JaxresError(f"target class {int(bad[0])} out of range: the model has {num_classes} classes (0..{num_classes - 1})")
        return jnp.asarray(values, jnp.int32)
    values = jnp.asarray(targets, jnp.int32)
    if values.ndim == 0:
        return jnp.full((count,), values)
    if values.shape != (count,):
        raise JaxresError(f"targets must be None, an int or {count} ints (one per image), got shape {values.shape}")
    return values



@functools.lru_cache(maxsize=64)
def _needs_batch_stats(model) -> bool:
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))  # fmt: skip
    return "batch_stats" in shapes


def check_variables(model, variables) -> None:
    """Raises JaxresError unless `variables` has the collections `model` needs: params, and
    batch_stats when its norm keeps running statistics (norm "batch")."""
    inference_variables(variables)
    if "batch_stats" not in variables and _needs_batch_stats(model):
        raise JaxresError(
            f"variables have no 'batch_stats' collection, which {type(model).__name__} (norm {getattr(model, 'norm', '?')!r}) "
            "needs for its BatchNorm running statistics: pass {'params': ..., 'batch_stats': ...} as "
            "models.init_variables or a checkpoint gives them"
        )



# --------------------------------------------------------------------------- post-processing and smoothing




def _post_processed_maps(model, variables, inputs, classes, key, size, *, layer, method, score, eigen_smooth, relu, normalize, upsample_to_input):
    return _post_processed_maps_and_logits(model, variables, inputs, classes, key, size, layer=layer, method=method, score=score,
                                           eigen_smooth=eigen_smooth, relu=relu, normalize=normalize, upsample_to_input=upsample_to_input)[0]  # fmt: skip


def _post_processed_maps_and_logits(model, variables, inputs, classes, key, size, *, layer, method, score, eigen_smooth, relu, normalize,
                                    upsample_to_input):  # fmt: skip
    """The post-processed maps and the logits of the forward pass they took (`cam_methods.raw_map_and_logits`)."""
    cam, logits = cam_methods.raw_map_and_logits(model, variables, inputs, classes, key, layer=layer, method=method, score=score,
                                                 eigen_smooth=eigen_smooth)  # fmt: skip
    if relu:
        cam = jax.nn.relu(cam)
    if upsample_to_input:
        cam = upsample(cam, size)
    if normalize:
        cam = min_max_normalize(cam)
    return cam, logits


def augmentation_smoothed(maps_of_inputs, inputs: jax.Array, classes) -> jax.Array:
    """aug_smooth: the mean of the maps of the 6 augmented inputs, each de-augmented.

    maps_of_inputs: (inputs float32[M, H, W, 3], classes int32[M] or None) -> float32[M, h, w];
    inputs float32[N, H, W, 3] (normalised, as the library's input_tensor). As base_cam.py's
    forward_augmentation_smoothing with its default tta.Compose([tta.HorizontalFlip(),
    tta.Multiply(factors=[0.9, 1, 1.1])]): every (flip, factor) pair, inputs multiplied by
    the factor (AUGMENTATION_FACTORS) and flipped left-right, each map post-processed as
    without smoothing, flipped back where the input was (Multiply's de-augmentation is the
    identity), and the 6 maps averaged (not normalised again). With classes None each
    augmented image explains its own predicted class, as the library's forward does. The 6 N
    images go through the model as one batch."""
    variants = [factor * (inputs[:, :, ::-1] if flipped else inputs) for flipped in (False, True) for factor in AUGMENTATION_FACTORS]
    count = len(variants)
    repeated = None if classes is None else jnp.tile(classes, count)
    maps = maps_of_inputs(jnp.concatenate(variants), repeated)
    maps = maps.reshape(count, inputs.shape[0], *maps.shape[1:])
    flipped = count // 2  # the second half, HorizontalFlip's True
    maps = jnp.concatenate([maps[:flipped], maps[flipped:, :, :, ::-1]])
    return jnp.mean(maps, axis=0)


@functools.partial(
    jax.jit, static_argnames=("model", "layer", "method", "score", "eigen_smooth", "aug_smooth", "relu", "normalize", "upsample_to_input")
)
def _gradcam(model, variables, images, targets, key=None, *, layer, method, score="logit", eigen_smooth=False, aug_smooth=False,
             relu, normalize, upsample_to_input):  # fmt: skip
    options = dict(layer=layer, method=method, score=score, eigen_smooth=eigen_smooth, relu=relu, normalize=normalize,
                   upsample_to_input=upsample_to_input)  # fmt: skip

    def maps_of_inputs(inputs, classes):
        return _post_processed_maps(model, variables, inputs, classes, key, images.shape[1:3], **options)

    inputs = normalize_images(images)
    return augmentation_smoothed(maps_of_inputs, inputs, targets) if aug_smooth else maps_of_inputs(inputs, targets)


def gradcam(
    model,
    variables,
    images,
    targets=None,
    layer: str = "layer3",
    method: str = "gradcam",
    relu: bool = True,
    normalize: bool = True,
    upsample: bool = True,
    *,
    score="logit",
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """Class activation maps of `images` for `targets`, explained at stage `layer`.

    One forward pass in inference mode (BatchNorm uses its running statistics) reads
    the stage's output A and the logits; one backward pass gives dS/dA, the gradient
    of each image's score S (by default its target class's pre-softmax logit; `score`).
    `method` turns A and dS/dA into a map (formulas in `jaxres.cam_methods`; the
    gradient-free methods skip the backward pass, scorecam and ablationcam add N K
    forward passes), which is then optionally
    ReLU'd, resized to the input and min-max normalised. The computation is jitted and
    cached per (model, layer, method, flags), and usable under `jax.jit`, `jax.vmap`
    and `jax.grad` (with respect to the images).

    Args:
      model: a jaxres Flax model; `model.STAGES` names its layers and
        `model.num_classes` its classes.
      variables: the model's variables, {"params": ..., "batch_stats": ...}; other
        collections are ignored.
      images: uint8 or float[N, H, W, 3] pixel values in [0, 255], normalised here as
        in training (a NumPy or JAX array, not a list). Concrete float images whose
        values all lie in [0, 1], and images with values above 255 (16-bit pixels), give
        a UserWarning (they would be seen as nearly black, or glaring).
      targets: the class to explain per image: None (each image's predicted class),
        an int (one class for all images) or ints[N].
      layer: one of `model.STAGES`; the map explains that stage's output (its
        residual add included).
      method: one of `ALL_METHODS` (formulas and their pytorch-grad-cam sources in
        `jaxres.cam_methods`): "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam",
        "gradcam_elementwise", "eigengradcam", "segeigencam", "shapleycam", "finercam",
        "fullgrad" (gradient-based; fullgrad ignores `layer`), "eigencam", "kpca_cam", "scorecam", "ablationcam", "fem",
        "randomcam" (gradient-free; scorecam and ablationcam run N K forward passes,
        batched on the device).
      relu: whether to apply the final ReLU (as all the papers do).
      normalize: whether to min-max normalise each map to [0, 1], after upsampling
        as the course library does; a flat map gives zeros.
      upsample: whether to resize the maps bilinearly to H x W (see `upsample`).
      score: what is explained (`cam_methods.target_scores`): "logit" (the class's
        pre-softmax logit), "softmax" (its probability), "binary" (a model with one output:
        +output for class 1, -output for class 0), "rest", "finer" (FinerCAM's target), or a function (logits
        float32[N, C], classes int32[N]) -> float32[N] (regression, custom targets).
      eigen_smooth: the first principal component of the weighted activations instead of
        their channel sum (pytorch-grad-cam's eigen_smooth), for the methods of
        `cam_methods.EIGEN_SMOOTH_METHODS`.
      aug_smooth: the mean of the maps of the flipped x (0.9, 1.0, 1.1)-scaled inputs, each
        de-augmented (`augmentation_smoothed`; pytorch-grad-cam's aug_smooth).
      key: a PRNG key, for "randomcam" (its random channel weights) and only there.

    Returns:
      float32[N, H, W] maps on the device, or float32[N, h, w] at the layer's
      resolution when `upsample=False`.

    Raises:
      JaxresError: for images that are not an array shaped [N, H, W, 3] or are too
        small for the model (`models.check_image_size`), variables without the
        collections the model needs (params; batch_stats with BatchNorm), an unknown
        layer or method, or targets that are empty, not integers, not one per image,
        or out of the model's class range; eigen_smooth with a method that has none;
        randomcam without a key (or a key with another method); an unknown score.

    Against pytorch-grad-cam 1.5.7 on the same weights (`jaxres.convert`, its
    `target_layers=[model.<layer>]`, `ClassifierOutputTarget`), the normalised maps of
    every method agree to about 5e-6 at every stage, except where jaxres differs on
    purpose:
    - Normalisation. pytorch-grad-cam min-max normalises each map at the layer's
      resolution, as (x - min) / (max - min + 1e-7), resizes it (cv2 bilinear, the
      same as `upsample`), and normalises again the same way; jaxres normalises once,
      after upsampling, with no epsilon. A bilinear resize commutes with that affine
      map, so the two differ only by the 1e-7 terms: negligible for a map whose range
      is well above 1e-7, and both give zeros for a flat map. A map whose range is
      itself ~1e-7 or less is stretched to [0, 1] here but shrunk towards 0 there:
      jaxres's result does not depend on the map's scale, and a flat map has an
      exactly zero gradient.
    - Ties in the global max head. jaxres's 2x2 max-pools send the gradient to the first
      maximum of each window, as PyTorch's `MaxPool2d` (`models.max_pool_2x2`); the
      global max head splits it equally among tied maxima (`jnp.max`) where PyTorch's
      `AdaptiveMaxPool2d` sends it all to the first; both are valid gradients with the
      same per-channel sums, so Grad-CAM's weights agree, while the elementwise methods
      (hirescam, layercam, gradcam++ through G^2 and G^3) can differ at layer3 where a
      channel's maximum is tied (e.g. a dead channel, all zeros after the ReLU).
    """
    _check_layer(model, layer)
    _check_method(method, eigen_smooth)
    check_images(images)
    check_variables(model, variables)
    _check_map_size(model, np.shape(images)[1:3], layer, normalize)
    if (method == "randomcam") != (key is not None):
        raise JaxresError("randomcam needs key=jax.random.key(seed)" if key is None else f"key is for randomcam only, not {method}")
    if not callable(score) and score not in SCORES:
        raise JaxresError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}, or pass a function (logits, classes) -> scores")
    if method == "finercam" and score != "logit":
        raise JaxresError(f"finercam is gradcam with score 'finer'; it takes no other score (got {score!r})")
    if (score == "finer" or method == "finercam") and model.num_classes < 1 + max(cam_methods.FINER_COMPARISON_CATEGORIES):
        raise JaxresError(f"score 'finer' compares each class with the 3 most similar ones: it needs 4 classes or more, the model has {model.num_classes}")
    if score == "binary":
        if model.num_classes != 1:
            raise JaxresError(f"score 'binary' needs a model with one output, {type(model).__name__} has {model.num_classes}")
        targets = prepare_targets(1 if targets is None else targets, np.shape(images)[0], 2)  # the positive class by default
    else:
        targets = prepare_targets(targets, np.shape(images)[0], model.num_classes)
    return _gradcam(
        model,
        variables,
        images,
        targets,
        key,
        layer=layer,
        method=method,
        score=score,
        eigen_smooth=bool(eigen_smooth),
        aug_smooth=bool(aug_smooth),
        relu=bool(relu),
        normalize=bool(normalize),
        upsample_to_input=bool(upsample),
    )


def _check_map_size(model, image_size, layer: str, normalize: bool) -> None:
    """JaxresError for images too small for `model` (`models.check_image_size`); a UserWarning
    when `layer`'s map is a single pixel and is to be normalised: min-max normalisation makes
    a one-value map all zeros."""
    models.check_image_size(model, image_size)
    sizes = models.stage_output_sizes(model, *map(int, image_size))
    if normalize and sizes.get(layer) == (1, 1):
        larger = [stage for stage, size in sizes.items() if size != (1, 1)]
        instead = f"; explain an earlier layer ({larger[-1]}'s is {'x'.join(map(str, sizes[larger[-1]]))})" if larger else ""
        warnings.warn(
            f"{layer}'s map is 1x1 for {image_size[0]}x{image_size[1]} images: a single value, so its normalised "
            f"map is all zeros{instead}",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- pictures


def overlay(image, cam, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """`cam` coloured with `colormap` and blended over `image`.

    image: uint8 or float[H, W, 3] in [0, 255]; cam: float[H, W] in [0, 1] (clipped);
    alpha: weight of the heatmap. Returns uint8[H, W, 3] = (1 - alpha) image + alpha heat.
    """
    import matplotlib

    image = np.asarray(image, np.float32)
    cam = np.asarray(cam, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise JaxresError(f"image must be [H, W, 3], got shape {image.shape}")
    if cam.shape != image.shape[:2]:
        raise JaxresError(f"cam shape {cam.shape} does not match the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise JaxresError(f"alpha must be in [0, 1], got {alpha}")
    try:
        colour_map = matplotlib.colormaps[colormap]
    except KeyError:
        raise JaxresError(f"unknown matplotlib colormap {colormap!r}") from None
    heat = colour_map(np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image + alpha * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def plot_cams(
    images,
    cams,
    true_labels=None,
    pred_labels=None,
    class_names: Sequence[str] | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    guided=None,
):
    """One row per image: the image, its heatmap and the overlay (the course library's view),
    and with `guided` a fourth column, Guided Grad-CAM.

    images: uint8[N, H, W, 3]; cams: float[N, H, W] in [0, 1]; labels: ints[N] or None,
    shown as names when `class_names` is given; title: a suptitle above the first row,
    wrapped to the figure's width; guided: uint8[N, H, W, 3] (`jaxres.guided.deprocess` of
    guided backprop x the maps) or None. Returns a matplotlib Figure (built without pyplot,
    so nothing is shown; constrained layout; save it with `figure.savefig(path)`).
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    cams = np.asarray(cams)
    if images.ndim != 4 or cams.shape != images.shape[:3]:
        raise JaxresError(f"images [N, H, W, 3] and cams [N, H, W] must match, got {images.shape} and {cams.shape}")
    count = len(images)
    if count == 0:
        raise JaxresError("no images to plot")
    if guided is not None and np.shape(guided) != images.shape:
        raise JaxresError(f"guided maps must have the images' shape {images.shape}, got {np.shape(guided)}")
    columns = 3 if guided is None else 4
    name = (lambda label: class_names[int(label)]) if class_names is not None else (lambda label: str(int(label)))
    # Constrained layout reserves the suptitle's own band above the first row's titles at
    # any row count (tight_layout does not: in a 16-row figure it lays the suptitle over the first row).
    figure = Figure(figsize=(2.2 * columns, 2.2 * count), layout="constrained")
    axes = np.asarray(figure.subplots(count, columns, squeeze=False))
    for row in range(count):
        image = images[row] if images.dtype == np.uint8 else np.clip(images[row], 0, 255).astype(np.uint8)
        parts = []
        if true_labels is not None:
            parts.append(f"true: {name(true_labels[row])}")
        if pred_labels is not None:
            parts.append(f"pred: {name(pred_labels[row])}")
        wrong = true_labels is not None and pred_labels is not None and int(true_labels[row]) != int(pred_labels[row])
        axes[row, 0].imshow(image, interpolation="nearest")
        axes[row, 0].set_title(", ".join(parts) or "image", fontsize=8, color="darkred" if wrong else "black")
        axes[row, 1].imshow(cams[row], cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[row, 1].set_title("heatmap", fontsize=8)
        axes[row, 2].imshow(overlay(image, cams[row], colormap, alpha), interpolation="nearest")
        axes[row, 2].set_title("overlay", fontsize=8)
        if guided is not None:
            axes[row, 3].imshow(np.asarray(guided[row]), interpolation="nearest")
            axes[row, 3].set_title("guided", fontsize=8)
        for column in range(columns):
            axes[row, column].axis("off")
    if title:
        figure.suptitle(textwrap.fill(title, width=_TITLE_CHARACTERS_PER_LINE))
    return figure


# --------------------------------------------------------------------------- command line


@functools.partial(jax.jit, static_argnames=("model",))
def _predicted_classes(model, variables, images):
    return jnp.argmax(model.apply(inference_variables(variables), normalize_images(images), train=False), axis=-1)


def _predict(model, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Predicted classes, int[N], of uint8[N, H, W, 3] images, `batch_size` at a time."""
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    return np.concatenate([np.asarray(_predicted_classes(model, variables, batch)) for batch in batches])


def round_robin_over_classes(indices, labels, count: int) -> np.ndarray:
    """Up to `count` of `indices`, taken round-robin over their classes: the first index of
    each class, then the second of each, ..., classes in order of first appearance, each
    class's indices in the given order. indices: int[M]; labels: int[M], the class of each.
    Returns int[min(count, M)], in the order taken (deterministic)."""
    indices, labels = np.asarray(indices), np.asarray(labels)
    _, first_position, class_of = np.unique(labels, return_index=True, return_inverse=True)
    class_rank = np.argsort(np.argsort(first_position))[class_of]  # 0 for the class seen first
    by_class = np.argsort(class_of, kind="stable")
    sizes = np.bincount(class_of)
    turn = np.empty(len(indices), np.int64)  # how many of its class come before it
    turn[by_class] = np.arange(len(indices)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return indices[np.lexsort((class_rank, turn))[:count]]


if __name__ == "__main__":  # `python -m jaxres.gradcam`: the command line lives in jaxres.cli
    from jaxres import cli

    sys.exit(cli.gradcam_main())
