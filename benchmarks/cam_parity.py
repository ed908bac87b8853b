"""jaxres's CAM methods against pytorch-grad-cam 1.5.7: parity of every method, and speed.

    PYTHONPATH=. /work/camref-venv/bin/python -m benchmarks.cam_parity            # ~23 min on 2 shared cores
    PYTHONPATH=. /work/camref-venv/bin/python -m benchmarks.cam_parity --workdir RUN1 RUN2 --option-stages all --repeats 5
    PYTHONPATH=. /work/camref-venv/bin/python -m benchmarks.cam_parity --summarize benchmarks/results/cam-parity-TIME.json

Runs in its own venv (benchmarks/README.md, "Grad-CAM against pytorch-grad-cam", says how to
build it): pytorch-grad-cam needs torchvision, which the project's venv does not have, and the
venv holds jax, flax and optax at the project's versions, so that one process runs both sides.
Never part of CI: the tests check every method against NumPy references written from the
library's source (tests/test_cam_methods.py and others); this script checks them against the
library itself.

What it does, for the custom ResNet and ResNet-18 (width 0.25 by default) with random but
fixed weights (NumPy draws; BatchNorm affines and running statistics random too, so nothing is
trivial), or a trained run (--workdir), converted to the PyTorch twin with `jaxres.convert`:

- Parity. On the same images (8 of the synthetic `shapes` by default, or --data), for every
  method of pytorch-grad-cam 1.5.7 that jaxres has, at every stage: the max |difference| of the
  normalised maps at the layer's resolution (the library's own layer map: what its
  `get_cam_image` returned, through its ReLU and `scale_cam_image`, read by wrapping that
  method; jaxres's `gradcam(..., upsample=False)`) and at the input size (the library's result
  against `gradcam(...)`), for ClassifierOutputTarget (score "logit") and
  ClassifierOutputSoftmaxTarget ("softmax"), and with eigen_smooth and aug_smooth where the
  library has them (at the last stage of each model; --option-stages ends or all for more). Then RefineCAM, SESS, and ROAD (ROADCombined and both averages, the
  imputer's noise 0 on both sides). Where the two cannot agree the row says why and compares
  what is defined:
  * the sign of a principal component (eigencam, eigengradcam, kpca_cam, any eigen_smooth): the
    library is run twice, as it is and with its projections negated (its get_2d_projection and
    get_2d_projection_kernel wrapped), and each image is compared with the one of the two that
    has its sign; `flipped` counts the images that needed the negated one;
  * randomness (randomcam: np.random against jax.random): shape and range only;
  * the 1e-7 in the library's normalisation (x - min) / (max - min + 1e-7), done twice, where
    jaxres normalises once without epsilon (see `jaxres.gradcam.gradcam`): a map whose range R
    is small differs by about 1e-7 / R; `rescaled` is the difference after min-max normalising
    the library's map exactly, which removes that term and nothing else (an affine map).
- Speed. Every method at the last stage of each model, the meta-methods and ROAD: jaxres jitted
  (the first call, compilation included, reported apart) against the library with its own
  defaults (its batch sizes for ScoreCAM, AblationCAM and SESS), same images, same threads
  (torch.set_num_threads and XLA pinned to the same cores), alternating one call of each per
  repeat, medians over the repeats, as images per second and the ratio jaxres / library.

Writes benchmarks/results/cam-parity-<UTC time>.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import common

TOLERANCE = 1e-5  # the issue's goal for every deterministic method

# jaxres method -> pytorch_grad_cam class (1.5.7's __init__; DeepFeatureFactorization is not
# compared: an NMF of the activations with its own random start and iteration count, it has no
# jaxres counterpart whose result could be compared)
LIBRARY_CLASSES = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
    "layercam": "LayerCAM", "gradcam_elementwise": "GradCAMElementWise", "eigengradcam": "EigenGradCAM",
    "segeigencam": "SegEigenCAM", "shapleycam": "ShapleyCAM", "finercam": "FinerCAM", "fullgrad": "FullGrad",
    "eigencam": "EigenCAM", "kpca_cam": "KPCA_CAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM",
    "fem": "FEM", "randomcam": "RandomCAM",
}  # fmt: skip
TARGET_FREE = ("eigencam", "kpca_cam", "fem", "randomcam")  # their maps do not depend on the target
SIGN_AMBIGUOUS = ("eigencam", "eigengradcam", "kpca_cam")  # a principal component's sign (segeigencam corrects it)
NO_AUG_SMOOTH = ("finercam",)  # FinerCAM.forward has no aug_smooth (nor have RefineCAM and SESS)
# the modules of pytorch_grad_cam that call get_2d_projection (or the kernel one) by their own name
PROJECTION_MODULES = ("base_cam", "hirescam", "layer_cam", "grad_cam_elementwise", "eigen_cam", "eigen_grad_cam", "fullgrad_cam")


# --------------------------------------------------------------------------- setup


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cam_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["custom_resnet", "resnet18"], choices=("custom_resnet", "resnet18"))
    parser.add_argument("--width", type=float, default=0.25, help="channel width of both models (default 0.25)")
    parser.add_argument("--workdir", nargs="+", default=None, metavar="RUN",
                        help="trained runs to use instead of random weights (their models; the first one's data unless --data)")  # fmt: skip
    parser.add_argument("--data", default=None, help="image source for jaxres.data.load_dataset (default: shapes, or the first run's)")
    parser.add_argument("--cache-dir", default=None, help="decoded-array cache (default $JAXRES_CACHE)")
    parser.add_argument("--images", type=int, default=8, help="test images explained (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side per method (default 3)")
    parser.add_argument("--option-stages", choices=("last", "ends", "all"), default="last",
                        help="where eigen_smooth and aug_smooth are compared: the last stage (default), the first and last, or all")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=None, choices=tuple(LIBRARY_CLASSES) + ("meta", "road"),
                        help="only these (default: every method, the meta-methods and ROAD)")  # fmt: skip
    parser.add_argument("--keep-denormals", action="store_true",
                        help="leave PyTorch's subnormal floats on (its default; XLA flushes them to zero, and on this "
                        "CPU they made the library's forward passes ~40x slower on a trained run)")  # fmt: skip
    parser.add_argument("--conv-backend", choices=("auto", "xla", "onednn"), default="auto",
                        help="jaxres's convolutions, whatever the runs trained with (default auto: oneDNN's on a CPU, "
                        "as python -m jaxres.gradcam has them)")  # fmt: skip
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder of the results JSON")
    parser.add_argument("--summarize", default=None, metavar="JSON", help="only print the README's tables of a results JSON")
    return parser.parse_args(argv)


def set_threads(threads: int) -> list[int]:
    """The same compute threads for both sides, before either framework is imported."""
    os.environ.update(common.thread_environment(threads))
    os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's and AblationCAM's progress bars
    # jaxres turns JAX's persistent compilation cache on when imported (jaxres/runtime.py): off
    # here, so that the first calls' times are compilations, not loads from an earlier run
    os.environ.setdefault("JAXRES_COMPILATION_CACHE", "0")
    return common.pin_to_cores(threads)


def import_torchvision():
    """torchvision 0.28 as the camref venv has it: its compiled ops are built against CUDA
    (libtorch_cuda.so), absent from the CPU torch, so they do not load; torchvision then fails
    on its own fake-kernel registration of torchvision::nms and ::qnms. Defining those two
    schemas first lets it import; pytorch-grad-cam uses only its transforms, never the ops."""
    import torch

    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [key for key in sys.modules if key == "torchvision" or key.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


def torch_resnet(width: float, stage_sizes=(2, 2, 2, 2), num_classes: int = 10):
    """The PyTorch twin of `jaxres.models.ResNet` (ResNet-18 by default), named as its Flax tree
    (prep.conv_block.conv, layer2.block1.conv1 / norm1 / conv2 / norm2 / shortcut_conv /
    shortcut_norm, classifier), so `jaxres.convert.flax_to_torch` fills it."""
    from torch import nn

    from benchmarks.torch_reference import ResidualStage, scaled_channels

    class BasicBlock(nn.Module):
        def __init__(self, in_channels, features, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, features, 3, stride, 1, bias=False)
            self.norm1 = nn.BatchNorm2d(features)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(features)
            self.projection = stride != 1 or in_channels != features
            if self.projection:
                self.shortcut_conv = nn.Conv2d(in_channels, features, 1, stride, 0, bias=False)
                self.shortcut_norm = nn.BatchNorm2d(features)
            self.relu2 = nn.ReLU()

        def forward(self, x):
            y = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
            return self.relu2(y + (self.shortcut_norm(self.shortcut_conv(x)) if self.projection else x))

    class Stage(nn.Module):
        def __init__(self, in_channels, features, blocks, stride):
            super().__init__()
            self.count = blocks
            for index in range(blocks):
                setattr(self, f"block{index + 1}", BasicBlock(in_channels if index == 0 else features, features, stride if index == 0 else 1))

        def forward(self, x):
            for index in range(self.count):
                x = getattr(self, f"block{index + 1}")(x)
            return x

    class ResNet(nn.Module):
        STAGES = ("prep", "layer1", "layer2", "layer3", "layer4")

        def __init__(self):
            super().__init__()
            c = lambda n: scaled_channels(n, width)  # noqa: E731
            self.prep = ResidualStage(3, c(64), residual=False, pool=False)
            channels = c(64)
            for index, (blocks, features) in enumerate(zip(stage_sizes, (64, 128, 256, 512))):
                setattr(self, f"layer{index + 1}", Stage(channels, c(features), blocks, 1 if index == 0 else 2))
                channels = c(features)
            self.classifier = nn.Linear(channels, num_classes)

        def forward(self, x):
            for stage in self.STAGES:
                x = getattr(self, stage)(x)
            return self.classifier(x.mean(dim=(2, 3)))

    return ResNet()


def torch_twin(name: str, model, variables):
    """The PyTorch twin of jaxres `model`, with `variables` loaded by jaxres.convert, in eval mode."""
    from benchmarks.torch_reference import CustomResNet
    from jaxres.convert import flax_to_torch

    if name == "custom_resnet":
        twin = CustomResNet(num_classes=model.num_classes, width=model.width, norm=model.norm, logit_scale=model.logit_scale)
    else:
        twin = torch_resnet(model.width, tuple(model.stage_sizes), model.num_classes)
    twin.load_state_dict(flax_to_torch(variables, model, tensors=True), strict=True)
    return twin.eval()


# --------------------------------------------------------------------------- the library's side


class LayerMaps:
    """Records what a CAM object's get_cam_image returns (the library's map at the layer's
    resolution, before its ReLU), by wrapping that bound method of the instance."""

    def __init__(self, cam):
        self.maps = []
        owner = getattr(cam, "base_cam", cam)  # FinerCAM computes with its base GradCAM
        original = owner.get_cam_image

        def recorded(*args, **kwargs):
            result = original(*args, **kwargs)
            self.maps.append(np.array(result.detach().cpu().numpy() if hasattr(result, "detach") else result, np.float32))
            return result

        owner.get_cam_image = recorded


@contextlib.contextmanager
def negated_projections():
    """pytorch_grad_cam's principal-component projections with the opposite sign."""
    import importlib

    patched = []
    for module_name in PROJECTION_MODULES + ("kpca_cam",):
        module = importlib.import_module(f"pytorch_grad_cam.{module_name}")
        for attribute in ("get_2d_projection", "get_2d_projection_kernel"):
            original = getattr(module, attribute, None)
            if original is not None:
                setattr(module, attribute, lambda *a, _original=original, **k: -_original(*a, **k))
                patched.append((module, attribute, original))
    try:
        yield
    finally:
        for module, attribute, original in patched:
            setattr(module, attribute, original)


def library_cam(method: str, twin, layer: str):
    import pytorch_grad_cam

    cls = getattr(pytorch_grad_cam, LIBRARY_CLASSES[method])
    if method == "fullgrad":  # every bias layer; a target layer would only print a warning
        return cls(model=twin, target_layers=[])
    return cls(model=twin, target_layers=[getattr(twin, layer)])


def release(cam) -> None:
    """Removes the hooks a library CAM object (or a meta-method's base objects) registered."""
    for owner in getattr(cam, "base_cam_per_layer", None) or [getattr(cam, "base_cam", cam)]:
        owner.activations_and_grads.release()


def library_targets(classes, score: str):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    kind = ClassifierOutputSoftmaxTarget if score == "softmax" else ClassifierOutputTarget
    return [kind(int(c)) for c in classes]


def library_maps(cam, recorder, method, inputs, classes, score, eigen_smooth, aug_smooth):
    """(layer map float32[N, h, w] or None, input-size map float32[N, H, W], the raw layer maps
    get_cam_image returned: one, or six with aug_smooth) of the library."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    recorder.maps.clear()
    if method == "finercam":  # its own target, from the most similar classes of the predicted one
        result = cam(inputs, None, eigen_smooth=eigen_smooth)
    else:
        result = cam(input_tensor=inputs, targets=library_targets(classes, score), aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    layer = None
    if recorder.maps and not aug_smooth and method != "fullgrad":
        layer = scale_cam_image(np.maximum(recorder.maps[0], 0))  # base_cam.py compute_cam_per_layer, without its resize
    return layer, np.asarray(result, np.float32), list(recorder.maps)


def augmentation_signs(model, variables, images, classes, layer, method, score, eigen_smooth, library_raws) -> np.ndarray:
    """int[N]: +1 where each of the six aug_smooth maps' principal component has the library's
    sign, -1 where each has the opposite one, 0 where the signs differ between augmentations
    (the averaged maps then mix signs: nothing to compare). jaxres's raw maps of the same six
    augmented inputs (`cam_methods.raw_map`, in `gradcam.augmentation_smoothed`'s order, which
    is ttach's product HorizontalFlip x Multiply(0.9, 1, 1.1)) against the library's, which
    get_cam_image returned."""
    import jax

    from jaxres import cam_methods
    from jaxres.augment import normalize
    from jaxres.gradcam import AUGMENTATION_FACTORS

    inputs = np.asarray(normalize(images))
    variants = [factor * (inputs[:, :, ::-1] if flipped else inputs) for flipped in (False, True) for factor in AUGMENTATION_FACTORS]
    raw = jax.jit(lambda v, x, t: cam_methods.raw_map(model, v, x, t, layer=layer, method=method, score=score, eigen_smooth=eigen_smooth))
    signs = []
    for variant, theirs in zip(variants, library_raws, strict=True):
        ours = np.asarray(raw(variables, variant, classes), np.float64)
        signs.append(np.sign(np.sum(ours.reshape(len(ours), -1) * np.asarray(theirs, np.float64).reshape(len(ours), -1), axis=1)))
    signs = np.stack(signs)
    return np.where(np.all(signs > 0, axis=0), 1, np.where(np.all(signs < 0, axis=0), -1, 0))


# --------------------------------------------------------------------------- comparisons


def per_image_max(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b).reshape(len(a), -1), axis=1)


def exact_min_max(maps) -> np.ndarray:
    maps = np.asarray(maps, np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def subset(jax_layer, jax_input, candidates, keep):
    """The images where `keep` (bool[N]) of jaxres's maps and of each candidate."""
    cut = lambda maps: None if maps is None else np.asarray(maps)[keep]  # noqa: E731
    return cut(jax_layer), cut(jax_input), [tuple(cut(m) for m in candidate[:2]) for candidate in candidates]


def compare(jax_layer, jax_input, candidates) -> dict:
    """Differences of jaxres's maps from the library's. candidates: [(layer, input)], the
    library as it is and (sign-ambiguous methods) with its projections negated; each image is
    compared with the candidate closest to it at the input size."""
    input_errors = np.stack([per_image_max(jax_input, candidate[1]) for candidate in candidates])
    choice = np.argmin(input_errors, axis=0)
    pick = lambda index: np.stack([candidates[c][index][i] for i, c in enumerate(choice)])  # noqa: E731
    lib_layer = None if jax_layer is None or candidates[0][0] is None else pick(0)
    lib_input = pick(1)
    out = {
        "input": float(per_image_max(jax_input, lib_input).max()),
        "input_rescaled": float(per_image_max(jax_input, exact_min_max(lib_input)).max()),
        "layer": None,
        "layer_rescaled": None,
        "flipped": int(np.sum(choice > 0)),
    }
    if lib_layer is not None:
        out["layer"] = float(per_image_max(jax_layer, lib_layer).max())
        out["layer_rescaled"] = float(per_image_max(jax_layer, exact_min_max(lib_layer)).max())
    return out


def verdict(row: dict) -> tuple[bool, str]:
    """(within TOLERANCE, note) of a parity row."""
    if row["method"] == "randomcam":
        return row["sane"], "random weights (np.random against jax.random): shape and range [0, 1] only"
    mixed = (f"the six augmented maps' principal components do not share one sign on {row['mixed_signs']} of {row['images']} images "
             "(their mean mixes signs), compared on the others") if row.get("mixed_signs") else ""  # fmt: skip
    if row["input"] is None:
        return True, mixed.replace(", compared on the others", ": no image to compare")
    worst = max(value for value in (row["input"], row["layer"]) if value is not None)
    rescaled = max((value for value in (row["input_rescaled"], row["layer_rescaled"]) if value is not None), default=worst)
    notes = [mixed] if mixed else []
    if row.get("flipped"):
        notes.append(f"principal component's sign: {row['flipped']} of {row['images']} images against the library's negated projection")
    if worst <= TOLERANCE:
        return True, "; ".join(notes)
    if rescaled <= TOLERANCE:
        notes.append(f"the library's 1e-7 normalisation epsilon: {rescaled:.1e} once its map is rescaled exactly to [0, 1]")
        return True, "; ".join(notes)
    exact = row.get("exact_float64")
    if exact is not None and exact["jaxres"] <= exact["float32_bound"]:
        notes.append(f"float32 resolves this first component only to eps32 sqrt(size) / gap = {exact['float32_bound']:.1e} (1 - s2/s1 "
                     f"down to {exact['gap']:.1e}): from the float64 result of the same activations jaxres's map is {exact['jaxres']:.1e} "
                     f"away, the library's {exact['library']:.1e}")  # fmt: skip
        return True, "; ".join(notes)
    referee = row.get("float64")
    aug = row["option"] == "aug_smooth"
    if referee is not None:
        both = max(value for value in (referee["input"], referee["layer"], referee["input_rescaled"] if not aug else None) if value is not None)
        best = min(value for value in (referee["input"], referee["input_rescaled"] if not aug else None) if value is not None)
        if best <= TOLERANCE:
            method = row["method"]
            cause = ("an ill-conditioned principal component" if method in SIGN_AMBIGUOUS + ("segeigencam",) or row["option"] == "eigen_smooth"
                     else "differences of nearly equal scores" if method in ("scorecam", "ablationcam")
                     else "where a gradient jumps between nearly tied maxima or at a ReLU's kink")  # fmt: skip
            notes.append(f"float32 rounding ({cause}): both sides in float64 agree to {best:.1e} (max {both:.1e} with the layer map)")
            return True, "; ".join(notes)
        notes.append(f"float64 on both sides: {best:.1e}")
    return False, "; ".join(notes)


# --------------------------------------------------------------------------- jaxres's side


def jaxres_program(model, layer, method, scores, eigen_smooth, aug_smooth):
    """One jitted program of `gradcam`'s maps for several scores: {score: (layer map or None,
    input-size map)} (one program, so the forward and backward passes are shared and compiled
    once)."""
    import jax

    from jaxres.gradcam import gradcam

    key = jax.random.key(0) if method == "randomcam" else None

    def maps(variables, images, targets):
        out = {}
        for score in scores:
            options = dict(score="logit" if score == "finer" else score, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, key=key)
            chosen = None if method == "finercam" else targets
            upsampled = gradcam(model, variables, images, chosen, layer, method, **options)
            low = None if (method == "fullgrad" or aug_smooth) else gradcam(model, variables, images, chosen, layer, method, upsample=False, **options)
            out[score] = (low, upsampled)
        return out

    return jax.jit(maps)


# --------------------------------------------------------------------------- parity


def exact_component_maps(model, variables, images, layer, method) -> tuple[np.ndarray, float, float]:
    """(layer maps float64[N, h, w], the smallest gap, the float32 bound) of eigencam or kpca_cam computed in float64
    NumPy from jaxres's own activations (as svd_on_activations.py, with sklearn's sigmoid
    kernel and centring for kpca_cam), ReLU'd and min-max normalised exactly. The gap is
    min over images of 1 - s2 / s1 (1 - lambda2 / lambda1): near 0 the first component turns
    with any rounding. The bound is the largest over images of eps32 sqrt(size) / gap, size the
    matrix decomposed (positions x channels, or the kernel's positions x positions): the
    Davis-Kahan bound on the component's turn for a backward-stable float32 decomposition, so
    a float32 map within it of the exact one is as good as float32 can give."""
    import jax

    from jaxres.augment import normalize

    _, state = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False, capture_intermediates=True, mutable=["intermediates"]))(
        variables, images)  # fmt: skip
    activation = np.asarray(state["intermediates"][layer]["__call__"][0], np.float64)
    count, height, width, channels = activation.shape
    maps, gaps, bounds = [], [], []
    eps32 = float(np.finfo(np.float32).eps)
    for rows in activation.reshape(count, height * width, channels):
        rows = rows - rows.mean(axis=0)
        if method == "eigencam":
            _, singular, vt = np.linalg.svd(rows, full_matrices=False)
            projection = rows @ vt[0]
            gaps.append(1 - singular[1] / singular[0] if singular[0] > 0 else 0.0)
            size = rows.size
        else:
            gram = np.tanh(rows @ rows.T / channels + 1.0)
            gram = gram - gram.mean(axis=0) - gram.mean(axis=1, keepdims=True) + gram.mean()
            values, vectors = np.linalg.eigh(gram)
            projection = vectors[:, -1] * np.sqrt(max(values[-1], 0.0))
            gaps.append(1 - values[-2] / values[-1] if values[-1] > 0 else 0.0)
            size = gram.size
        maps.append(projection.reshape(height, width))
        bounds.append(eps32 * np.sqrt(size) / max(gaps[-1], 1e-12))
    return np.stack(maps), float(min(gaps)), float(max(bounds))


def float64_referee(name, model, variables, images, classes, inputs, method, layer, score, eigen_smooth, aug_smooth, keep) -> dict:
    """The comparison again with both sides computing in float64 (jaxres's model with dtype
    float64 under jax.enable_x64, its maps still float32 from there; the library's twin and
    input in double): where float32 rounding decides which of two nearly tied maxima a
    gradient goes to (max-pool windows, the global max head, ReLU kinks), float32 maps can
    differ locally by far more than 1e-5 while the float64 ones agree."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64)
        variables64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        program = jaxres_program(model64, layer, method, (score,), eigen_smooth, aug_smooth)
        jax_layer, jax_input = (None if m is None else np.asarray(m) for m in program(variables64, np.asarray(images, np.float64), classes)[score])
    twin64 = torch_twin(name, model, variables).double()
    cam = library_cam(method, twin64, layer)
    recorder = LayerMaps(cam)
    candidates = [library_maps(cam, recorder, method, inputs.double(), classes, score, eigen_smooth, aug_smooth)]
    if method in SIGN_AMBIGUOUS or eigen_smooth:
        with negated_projections():
            candidates.append(library_maps(cam, recorder, method, inputs.double(), classes, score, eigen_smooth, aug_smooth))
    release(cam)
    return compare(*subset(jax_layer, jax_input, candidates, keep))


def parity_specs(model, method: str, option_stages: str):
    """(layer, option, eigen_smooth, aug_smooth, scores) of one method for one model."""
    from jaxres.cam_methods import EIGEN_SMOOTH_METHODS

    stages = tuple(model.STAGES)
    if method == "fullgrad":  # it ignores the layer
        stages = (stages[-1],)
    option_at = {"all": stages, "ends": (stages[0], stages[-1]), "last": stages[-1:]}[option_stages]
    if method in TARGET_FREE:
        plain_scores = ("logit",)
    elif method == "finercam":
        plain_scores = ("finer",)
    else:
        plain_scores = ("logit", "softmax")
    for layer in stages:
        yield layer, "plain", False, False, plain_scores
        if layer in option_at and method in EIGEN_SMOOTH_METHODS and method != "randomcam":
            yield layer, "eigen_smooth", True, False, plain_scores[:1]
        if layer in option_at and method not in NO_AUG_SMOOTH and method != "randomcam":
            yield layer, "aug_smooth", False, True, plain_scores[:1]


def run_parity(name, model, variables, twin, images, classes, inputs, option_stages, methods, log) -> list[dict]:
    rows = []
    count = len(images)
    for method in methods:
        cams = {}
        for layer, option, eigen_smooth, aug_smooth, scores in parity_specs(model, method, option_stages):
            started = time.perf_counter()
            program = jaxres_program(model, layer, method, scores, eigen_smooth, aug_smooth)
            ours = {score: tuple(None if m is None else np.asarray(m) for m in pair) for score, pair in program(variables, images, classes).items()}
            jaxres_s = time.perf_counter() - started
            if layer not in cams:
                cam = library_cam(method, twin, layer)
                cams[layer] = (cam, LayerMaps(cam))
            cam, recorder = cams[layer]
            for score in scores:
                started = time.perf_counter()
                candidates = [library_maps(cam, recorder, method, inputs, classes, score, eigen_smooth, aug_smooth)]
                if (method in SIGN_AMBIGUOUS or eigen_smooth) and per_image_max(ours[score][1], candidates[0][1]).max() > TOLERANCE:
                    with negated_projections():  # the sign: the library once more with its projections negated
                        candidates.append(library_maps(cam, recorder, method, inputs, classes, score, eigen_smooth, aug_smooth))
                library_s = time.perf_counter() - started
                jax_layer, jax_input = ours[score]
                row = dict(model=name, stage="(all bias layers)" if method == "fullgrad" else layer, method=method,
                           library=LIBRARY_CLASSES[method], option=option, target=score if method not in TARGET_FREE else "-",
                           images=count)  # fmt: skip
                if method == "randomcam":
                    lib_input = candidates[0][1]
                    row.update(input=None, layer=None, input_rescaled=None, layer_rescaled=None, flipped=0,
                               sane=bool(jax_input.shape == lib_input.shape and 0 <= jax_input.min() and jax_input.max() <= 1 + 1e-6
                                         and 0 <= lib_input.min() and lib_input.max() <= 1 + 1e-6))  # fmt: skip
                else:
                    keep = np.ones(count, bool)
                    if aug_smooth and (method in SIGN_AMBIGUOUS or eigen_smooth):
                        signs = augmentation_signs(model, variables, images, classes, layer, method, score, eigen_smooth, candidates[0][2])
                        keep = signs != 0
                        row["mixed_signs"] = int(np.sum(~keep))
                    if keep.any():
                        row.update(compare(*subset(jax_layer, jax_input, candidates, keep)))
                        if aug_smooth:  # a mean of normalised maps: no min-max to undo
                            row["input_rescaled"] = None
                    else:
                        row.update(input=None, layer=None, input_rescaled=None, layer_rescaled=None, flipped=0)
                    if not verdict(row)[0]:  # over the tolerance in float32: both sides again in float64
                        row["float64"] = float64_referee(name, model, variables, images, classes, inputs, method, layer, score,
                                                         eigen_smooth, aug_smooth, keep)  # fmt: skip
                        if method in ("eigencam", "kpca_cam") and not eigen_smooth and not aug_smooth:
                            exact, gap, bound = exact_component_maps(model, variables, images, layer, method)
                            both = [exact_min_max(np.maximum(sign * exact, 0)) for sign in (1, -1)]
                            away = lambda maps: float(np.minimum(*(per_image_max(exact_min_max(maps), e) for e in both)).max())  # noqa: E731
                            row["exact_float64"] = {"gap": gap, "float32_bound": bound, "jaxres": away(jax_layer),
                                                    "library": min(away(c[0]) for c in candidates)}  # fmt: skip
                row["ok"], row["note"] = verdict(row)
                row["seconds"] = {"jaxres_with_compile": round(jaxres_s, 3), "library": round(library_s, 3)}
                rows.append(row)
                log(parity_line(row))
        for cam, _ in cams.values():
            release(cam)
    return rows


def meta_parity(name, model, variables, twin, images, classes, inputs, log) -> list[dict]:
    """RefineCAM over every stage (its default base method, Grad-CAM++, and Grad-CAM) and SESS
    (its default, Grad-CAM, 12 scales) at the last stage, input size only (both are products or
    fusions of input-size maps)."""
    import pytorch_grad_cam

    from jaxres import cam_meta

    rows = []
    stages = tuple(model.STAGES)
    layers = [getattr(twin, stage) for stage in stages]
    cases = [
        ("refinecam", "gradcam++", "(all stages)", lambda: pytorch_grad_cam.RefineCAM(twin, layers),
         lambda: cam_meta.refinecam(model, variables, images, classes, layers=stages)),
        ("refinecam", "gradcam", "(all stages)", lambda: pytorch_grad_cam.RefineCAM(twin, layers, base_method=pytorch_grad_cam.GradCAM),
         lambda: cam_meta.refinecam(model, variables, images, classes, layers=stages, method="gradcam")),
        ("sess", "gradcam", stages[-1], lambda: pytorch_grad_cam.SESS(twin, layers[-1:]),
         lambda: cam_meta.sess(model, variables, images, classes, layer=stages[-1])),
    ]  # fmt: skip
    for method, base, stage, make_library, ours in cases:
        jax_input = np.asarray(ours())
        cam = make_library()
        lib_input = np.asarray(cam(inputs, library_targets(classes, "logit")), np.float32)
        release(cam)
        row = dict(model=name, stage=stage, method=f"{method}({base})", library=f"{'RefineCAM' if method == 'refinecam' else 'SESS'}"
                   f"(base_method={LIBRARY_CLASSES[base]})", option="plain", target="logit", images=len(images))  # fmt: skip
        row.update(compare(None, jax_input, [(None, lib_input)]))
        row["ok"], row["note"] = verdict(row)
        rows.append(row)
        log(parity_line(row))
    return rows


def road_parity(name, model, variables, twin, images, classes, inputs, cams, log) -> dict:
    """ROAD with the imputer's noise 0 on both sides (the library's NoisyLinearImputer default
    noise set to 0 for this call): its ROADCombined and both averages over 10..90."""
    from pytorch_grad_cam.metrics import road as road_module

    from jaxres import cam_metrics

    ours = cam_metrics.road(model, variables, images, cams, classes, noise=0.0)
    targets = library_targets(classes, "softmax")
    defaults = road_module.NoisyLinearImputer.__init__.__defaults__
    road_module.NoisyLinearImputer.__init__.__defaults__ = (0.0, *defaults[1:])
    try:
        lib = {
            "combined": road_module.ROADCombined()(inputs, cams, targets, twin),
            "most_relevant_first_average": road_module.ROADMostRelevantFirstAverage()(inputs, cams, targets, twin),
            "least_relevant_first_average": road_module.ROADLeastRelevantFirstAverage()(inputs, cams, targets, twin),
        }
    finally:
        road_module.NoisyLinearImputer.__init__.__defaults__ = defaults
    result = {key: float(np.max(np.abs(np.asarray(getattr(ours, key)) - np.asarray(value)))) for key, value in lib.items()}
    result.update(model=name, ok=max(result.values()) <= TOLERANCE,
                  score_range=float(np.ptp(np.asarray(ours.most_relevant_first))))  # fmt: skip
    log(f"  ROAD {name}: " + ", ".join(f"{key} {value:.2e}" for key, value in result.items() if isinstance(value, float)))
    return result


def parity_line(row) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    return (f"  {row['model']:<14} {row['stage']:<18} {row['method']:<22} {row['option']:<12} {row['target']:<8} "
            f"layer {fmt(row['layer'])} input {fmt(row['input'])} {'ok' if row['ok'] else 'DIFFERS'} {row['note']}")  # fmt: skip


# --------------------------------------------------------------------------- speed


PAUSE_S = 0.2  # between timed calls: the other side's idle threads (XLA's, OpenMP's, OpenBLAS's) stop spinning first


def timed(function) -> float:
    time.sleep(PAUSE_S)
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def time_pair(ours, theirs, repeats: int) -> dict:
    """jaxres's first call (compilation included), then `repeats` alternating calls of each side
    (the library warmed up once first); medians and the pairwise ratios."""
    first = timed(ours)
    timed(theirs)
    jaxres_s, library_s = [], []
    for _ in range(repeats):
        jaxres_s.append(timed(ours))
        library_s.append(timed(theirs))
    jaxres_median, library_median = statistics.median(jaxres_s), statistics.median(library_s)
    return {
        "jaxres_first_call_s": first,
        "jaxres_compile_s": max(first - jaxres_median, 0.0),
        "jaxres_s": jaxres_s,
        "library_s": library_s,
        "jaxres_median_s": jaxres_median,
        "library_median_s": library_median,
        "ratio_median": statistics.median(common.pairwise_ratios(library_s, jaxres_s)),
    }


def run_speed(name, model, variables, twin, images, classes, inputs, repeats, methods, log) -> list[dict]:
    import jax
    import pytorch_grad_cam
    from pytorch_grad_cam.metrics.road import ROADCombined

    from jaxres import cam_meta, cam_metrics
    from jaxres.gradcam import gradcam

    stages = tuple(model.STAGES)
    layer = stages[-1]
    count = len(images)
    targets = library_targets(classes, "logit")
    cases = []
    for method in (m for m in LIBRARY_CLASSES if m in methods):
        key = jax.random.key(0) if method == "randomcam" else None
        chosen = None if method == "finercam" else classes

        def ours(method=method, key=key, chosen=chosen):
            return np.asarray(gradcam(model, variables, images, chosen, layer, method, key=key))

        def make(method=method):
            cam = library_cam(method, twin, layer)
            if method == "finercam":
                return cam, lambda: cam(inputs, None)
            return cam, lambda: cam(input_tensor=inputs, targets=targets)

        cases.append((method, LIBRARY_CLASSES[method], "plain", ours, make))
    for option in ("aug_smooth", "eigen_smooth") if "gradcam" in methods else ():
        cases.append((
            "gradcam", "GradCAM", option,
            lambda option=option: np.asarray(gradcam(model, variables, images, classes, layer, **{option: True})),
            lambda option=option: (lambda cam: (cam, lambda: cam(input_tensor=inputs, targets=targets, **{option: True})))(library_cam("gradcam", twin, layer)),
        ))  # fmt: skip
    layers = [getattr(twin, stage) for stage in stages]
    meta = []
    meta.append(("refinecam(gradcam++)", "RefineCAM", "all stages", lambda: np.asarray(cam_meta.refinecam(model, variables, images, classes, layers=stages)),
                  lambda: (lambda cam: (cam, lambda: cam(inputs, targets)))(pytorch_grad_cam.RefineCAM(twin, layers))))  # fmt: skip
    meta.append(("sess(gradcam)", "SESS", "12 scales", lambda: np.asarray(cam_meta.sess(model, variables, images, classes, layer=layer)),
                  lambda: (lambda cam: (cam, lambda: cam(inputs, targets)))(pytorch_grad_cam.SESS(twin, layers[-1:]))))  # fmt: skip
    if "meta" in methods:
        cases.extend(meta)
    cams = np.asarray(gradcam(model, variables, images, classes, layer))
    road_key = jax.random.key(1)
    road_targets = library_targets(classes, "softmax")
    cases.append(("road", "ROADCombined", "9 percentiles, both orders",
                  lambda: np.asarray(cam_metrics.road(model, variables, images, cams, classes, key=road_key).combined),
                  lambda: (None, lambda: ROADCombined()(inputs, cams, road_targets, twin))))  # fmt: skip
    if "road" not in methods:
        cases.pop()
    rows = []
    for method, library, option, ours, make in cases:
        cam, theirs = make()
        result = time_pair(ours, theirs, repeats)
        if cam is not None:
            release(cam)
        row = dict(model=name, stage=layer, method=method, library=library, option=option, images=count, **result)
        row["jaxres_images_per_s"] = count / result["jaxres_median_s"]
        row["library_images_per_s"] = count / result["library_median_s"]
        rows.append(row)
        log(f"  {name:<14} {method:<22} {option:<14} jaxres {row['jaxres_images_per_s']:8.1f} img/s (compile {result['jaxres_compile_s']:.1f} s)"
            f"  library {row['library_images_per_s']:8.1f} img/s  x{result['ratio_median']:.2f}")  # fmt: skip
    return rows


# --------------------------------------------------------------------------- tables


def parity_table(rows) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1e}"  # noqa: E731
    lines = ["| model | stage | method (library) | option | target | layer | layer, rescaled | input | input, rescaled | ok | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['model']} | {row['stage']} | {row['method']} ({row['library']}) | {row['option']} | {row['target']} | "
                     f"{fmt(row['layer'])} | {fmt(row['layer_rescaled'])} | {fmt(row['input'])} | {fmt(row['input_rescaled'])} | "
                     f"{'yes' if row['ok'] else '**no**'} | {row['note']} |")  # fmt: skip
    return "\n".join(lines)


def speed_table(rows) -> str:
    lines = ["| model | method (library) | option | jaxres img/s | compile s | library img/s | ratio jaxres/library |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['method']} ({row['library']}) | {row['option']} | {row['jaxres_images_per_s']:.1f} | "
                     f"{row['jaxres_compile_s']:.1f} | {row['library_images_per_s']:.1f} | {row['ratio_median']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def summary_tables(record) -> str:
    """The README's tables of a results JSON: parity per method and option (the worst over
    stages and targets, per model), then speed per method (both models side by side)."""
    fmt = lambda v: "–" if v is None else f"{v:.1e}"  # noqa: E731
    names = list(record["models"])
    groups = {}
    for row in record["parity"]:
        groups.setdefault((row["method"], row["library"], row["option"]), {}).setdefault(row["model"], []).append(row)
    head = " | ".join(f"{name}: layer / input" for name in names)
    lines = [f"| method (pytorch-grad-cam) | option | {head} | <= 1e-5 | why not, where not (stages) |",
             "|---|---|" + "---|" * len(names) + "---|---|"]  # fmt: skip
    for (method, library, option), by_model in groups.items():
        cells, notes, ok = [], {}, True
        for name in names:
            rows = by_model.get(name, [])
            # the library's map rescaled exactly where that is what its row compares (its 1e-7 epsilon)
            best = lambda r, key: min(v for v in (r[key], r[f"{key}_rescaled"]) if v is not None)  # noqa: E731
            layer = max((best(r, "layer") for r in rows if r["layer"] is not None), default=None)
            inputs = max((best(r, "input") for r in rows if r["input"] is not None), default=None)
            cells.append(f"{fmt(layer)} / {fmt(inputs)}")
            for r in rows:
                ok &= r["ok"]
                raw_ok = all(v is None or v <= TOLERANCE for v in (r["layer"], r["input"]))
                for clause in filter(None, r["note"].split("; ")):
                    if not (raw_ok and clause.startswith("principal component's sign")):  # sign-matched and within 1e-5: nothing to say
                        where = f"{name} {r['stage']}" + ("" if r["target"] in ("-", "logit") else f" {r['target']}")
                        notes.setdefault(clause.split(":")[0].split(" on ")[0], []).append(where)
        why = "; ".join(f"{note} ({', '.join(where)})" for note, where in notes.items())
        lines.append(f"| {method} ({library}) | {option} | {' | '.join(cells)} | {'yes' if ok else '**no**'} | {why} |")
    road = record.get("road_parity", [])
    if road:
        lines.append(f"| ROAD (ROADCombined, ROAD*Average; noise 0) | 10..90 | "
                     + " | ".join(next((f"{max(r['combined'], r['most_relevant_first_average'], r['least_relevant_first_average']):.1e}"
                                        for r in road if r["model"] == name), "–") for name in names)
                     + f" | {'yes' if all(r['ok'] for r in road) else '**no**'} | |")  # fmt: skip
    speed = {}
    for row in record["speed"]:
        speed.setdefault((row["method"], row["library"], row["option"]), {})[row["model"]] = row
    head = " | ".join(f"{name}: jaxres / library img/s, ratio" for name in names)
    backend = record.get("args", {}).get("conv_backend", "xla")  # the runs before the flag: the runs' own, xla
    lines += ["", f"jaxres's convolutions: `{backend}`", "", f"| method (pytorch-grad-cam) | option | {head} | jaxres compile s |", "|---|---|" + "---|" * len(names) + "---|"]
    for (method, library, option), by_model in speed.items():
        cells = [f"{r['jaxres_images_per_s']:.1f} / {r['library_images_per_s']:.1f}, **{r['ratio_median']:.1f}x**" if (r := by_model.get(name)) else "–"
                 for name in names]  # fmt: skip
        compile_s = " / ".join(f"{by_model[name]['jaxres_compile_s']:.1f}" for name in names if name in by_model)
        lines.append(f"| {method} ({library}) | {option} | {' | '.join(cells)} | {compile_s} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def with_backend(model, choice: str):
    """`model` computing its convolutions with the backend `choice` (`jaxres.backends.resolve`)."""
    from jaxres import backends

    return model.clone(conv=backends.resolve(choice).conv)


def load_models(args):
    """[(name, model, variables)] and the images uint8[N, H, W, 3] they explain."""
    from jaxres import data, evaluate, models

    if args.workdir:
        runs = [evaluate.load_for_inference(workdir) for workdir in args.workdir]
        config = runs[0][2]
        dataset = data.load_dataset(args.data or config.data, cache_dir=args.cache_dir or config.cache_dir, progress=False)
        built = [(run_config.model, with_backend(model, args.conv_backend), variables) for model, variables, run_config in runs]
        return built, np.asarray(dataset.test.images[: args.images])
    dataset = data.load_dataset(args.data or "shapes", cache_dir=args.cache_dir, progress=False)
    images = np.asarray(dataset.test.images[: args.images])
    built = []
    for offset, name in enumerate(args.models):
        model = with_backend(models.create_model(name, width=args.width, num_classes=len(dataset.class_names)), args.conv_backend)
        built.append((name, model, common.random_variables(model, args.seed + offset)))
    return built, images


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summary_tables(json.loads(Path(args.summarize).read_text())))
        return 0
    cores = set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    flushed = torch.set_flush_denormal(not args.keep_denormals)  # as XLA:CPU does (FTZ/DAZ): the same arithmetic
    import_torchvision()
    import jax
    import pytorch_grad_cam  # noqa: F401

    from jaxres.augment import normalize
    from jaxres.gradcam import gradcam

    warnings.filterwarnings("ignore", message=".*HiResCAM's faithfulness.*")
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def log(text):
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    methods = set(args.methods or (*LIBRARY_CLASSES, "meta", "road"))
    built, images = load_models(args)
    record = {
        "suite": "cam-parity",
        "timestamp_utc": stamp,
        "args": vars(args),
        "machine": {**common.machine_record(), "amx_flags": _amx_flags(), "pinned_cores": cores, "torch_threads": torch.get_num_threads(),
                    "torch_flush_denormal": bool(flushed and not args.keep_denormals),
                    "jax_devices": [str(d) for d in jax.devices()]},  # fmt: skip
        "packages": common.package_versions(("jax", "jaxlib", "flax", "numpy", "torch", "torchvision", "grad-cam", "scikit-learn", "scipy",
                                             "opencv-python-headless", "ttach")),  # fmt: skip
        "git": common.git_commit(),
        "tolerance": TOLERANCE,
        "models": {},
        "parity": [],
        "road_parity": [],
        "speed": [],
    }
    out = Path(args.out) / f"cam-parity-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every model too, so that an interrupted run keeps what it measured
        record["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(record, indent=1) + "\n")

    log(f"{record['machine']['cpu_model']}, {len(cores)} cores pinned, torch threads {torch.get_num_threads()}, {len(images)} images")
    for name, model, variables in built:
        twin = torch_twin(name, model, variables)
        inputs_nhwc = np.asarray(normalize(images))
        inputs = torch.from_numpy(np.ascontiguousarray(inputs_nhwc.transpose(0, 3, 1, 2)))
        logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs_nhwc))
        with torch.no_grad():
            torch_logits = twin(inputs).numpy()
        classes = np.argmax(logits, axis=-1).astype(np.int32)
        record["models"][name] = {
            "width": getattr(model, "width", None), "stages": list(model.STAGES),
            "logits_max_abs_diff": float(np.max(np.abs(logits - torch_logits))), "logits_range": float(np.ptp(logits)),
            "argmax_agree": bool(np.array_equal(classes, np.argmax(torch_logits, axis=-1))), "classes": classes.tolist(),
        }  # fmt: skip
        log(f"{name}: logits max |diff| {record['models'][name]['logits_max_abs_diff']:.1e} (range {record['models'][name]['logits_range']:.2f}), "
            f"argmax agree {record['models'][name]['argmax_agree']}, classes {classes.tolist()}")  # fmt: skip
        if not args.skip_parity:
            record["parity"].extend(run_parity(name, model, variables, twin, images, classes, inputs, args.option_stages,
                                               [m for m in LIBRARY_CLASSES if m in methods], log))  # fmt: skip
            if "meta" in methods:
                record["parity"].extend(meta_parity(name, model, variables, twin, images, classes, inputs, log))
            if "road" in methods:
                cams = np.asarray(gradcam(model, variables, images, classes, model.STAGES[-1]))
                record["road_parity"].append(road_parity(name, model, variables, twin, images, classes, inputs, cams, log))
        if not args.skip_speed:
            record["speed"].extend(run_speed(name, model, variables, twin, images, classes, inputs, args.repeats, methods, log))
        save()
    record["machine"]["load_average_at_end"] = list(os.getloadavg())
    save()
    print()
    if record["parity"]:
        print(parity_table(record["parity"]))
        print()
    if record["speed"]:
        print(speed_table(record["speed"]))
        print()
    failed = [row for row in record["parity"] if not row["ok"]] + [row for row in record["road_parity"] if not row["ok"]]
    print(f"wrote {out}: {len(record['parity'])} parity rows ({len(failed)} over {TOLERANCE:g}), {len(record['speed'])} speed rows, "
          f"{record['wall_s']:.0f} s")  # fmt: skip
    return 0


def _amx_flags() -> int:
    try:
        return sum("amx" in line for line in Path("/proc/cpuinfo").read_text().splitlines())  # grep -c amx /proc/cpuinfo
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
