"""Every CAM method of jaxres on the same images of one trained run, in one figure.

    python -m jaxres.train --preset shapes_demo --workdir runs/shapes
    python -m benchmarks.cam_gallery --workdir runs/shapes --out benchmarks/results/cam-methods-shapes.png

Rows: the first `--images` test images of the run's data (each explained for its predicted
class); columns: the image, then every method of `jaxres.gradcam.ALL_METHODS` at `--layer`
(default the model's last stage), then the meta-methods RefineCAM (over every stage) and
SESS (`jaxres.cam_meta`), then Guided Grad-CAM (`jaxres.guided`, shown as an image). The
README shows the figure of the synthetic shapes run: its images are generated, so the
figure may be committed (CIFAR-10's may not).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxres import cam_meta, evaluate, gradcam, guided, plots
from jaxres.augment import normalize


def deprocess(image: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's `deprocess_image` for a guided gradient: standardised, x 0.1,
    + 0.5, clipped to [0, 1].  float[H, W, 3] -> float[H, W, 3]."""
    image = (image - image.mean()) / (image.std() + 1e-5)
    return np.clip(image * 0.1 + 0.5, 0, 1)


def gallery_maps(model, variables, images, layer: str) -> dict[str, np.ndarray]:
    """{column title: float32[N, H, W] map in [0, 1], or float[N, H, W, 3] image (Guided
    Grad-CAM)} for every method, each explaining the predicted class; also prints each
    method's wall time (compilation included)."""
    predicted = np.asarray(jax.numpy.argmax(model.apply(gradcam.inference_variables(variables), normalize(images)), -1))
    columns = {}
    for method in gradcam.ALL_METHODS:
        started = time.perf_counter()
        key = jax.random.key(0) if method == "randomcam" else None
        columns[method] = np.asarray(gradcam.gradcam(model, variables, images, predicted, layer=layer, method=method, key=key))
        print(f"{method:>22}: {time.perf_counter() - started:6.2f} s", file=sys.stderr)
    columns["RefineCAM (all stages)"] = np.asarray(cam_meta.refinecam(model, variables, images, predicted))
    columns["SESS (gradcam)"] = np.asarray(cam_meta.sess(model, variables, images, predicted, layer=layer))
    combined = np.asarray(guided.guided_gradcam(model, variables, images, predicted, layer=layer))
    columns["Guided Grad-CAM"] = np.stack([deprocess(image) for image in combined])
    return columns


def plot_gallery(images: np.ndarray, columns: dict[str, np.ndarray], class_names, predicted, title: str) -> Figure:
    """One row per image: the image, then each column's overlay (or image)."""
    rows, count = len(images), len(columns) + 1
    figure = Figure(figsize=(1.3 * count, 1.4 * rows + 0.6))
    axes = figure.subplots(rows, count, squeeze=False)
    for row in range(rows):
        axes[row, 0].imshow(images[row], interpolation="nearest")
        axes[row, 0].set_title(f"predicted: {class_names[predicted[row]]}", fontsize=6)
        for column, (name, maps) in enumerate(columns.items(), start=1):
            picture = maps[row] if maps.ndim == 4 else gradcam.overlay(images[row], maps[row])
            axes[row, column].imshow(picture, interpolation="nearest")
            if row == 0:
                axes[row, column].set_title(name, fontsize=6, rotation=30, ha="left", va="bottom")
        for axis in axes[row]:
            axis.axis("off")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cam_gallery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run (python -m jaxres.train)")
    parser.add_argument("--images", type=int, default=6, help="test images, the first ones (default: 6)")
    parser.add_argument("--layer", default=None, help="the stage explained (default: the model's last)")
    parser.add_argument("--out", default="cam-methods.png", help="the figure (default: cam-methods.png)")
    args = parser.parse_args(argv)
    model, variables, config, dataset = evaluate.load_run_and_data(args.workdir)
    layer = args.layer or tuple(model.STAGES)[-1]
    images = np.asarray(dataset.test.images[: args.images])
    columns = gallery_maps(model, variables, images, layer)
    predicted = np.asarray(jax.numpy.argmax(model.apply(gradcam.inference_variables(variables), normalize(images)), -1))
    title = f"every method at {layer}, each for the predicted class: {config.model} width {config.width} trained on {config.data}"
    print(f"wrote {plots.save_figure(plot_gallery(images, columns, dataset.class_names, predicted, title), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
