"""The README's pictures, from real runs: curves, mistakes, Grad-CAM, the LR range test, CAMs vs masks.

    python -m benchmarks.figures [--quick-workdir RUN] [--shapes-workdir RUN] [--out benchmarks/results/figures]

Without `--quick-workdir` it first trains the README quick-start run (CIFAR-10 copy, width
0.25, 4 epochs, batch 256, 10,000 training images) into `<runs>/quick`; without
`--shapes-workdir` the offline shapes demo (width 0.25, 3 epochs, batch 256) into
`<runs>/shapes`. Both go through `python -m jaxres.train` in a subprocess whose `XLA_FLAGS`
switch off XLA:CPU's YNNPACK fusions (about 3x faster on CPU; this process sets the same
flag for its own LR range test and CAMs). A finished run already in `<runs>/NAME` (default
`runs/figures/NAME`, git-ignored) is reused; an interrupted one is resumed.

Writes into `--out` (PNGs at 90 dpi, each well under 150 KB):

    curves.png         loss and accuracy per epoch of the quick-start run
    misclassified.png  15 misclassified CIFAR-10 test images (true -> predicted)
    gradcam.png        Grad-CAM at layer3 of 8 test images of 8 different classes
    lr_find.png        the LR range test of the quick-start config (its fresh model, 200 steps)
    shapes_cams.png    shapes test images, their Grad-CAM and the object mask's outline,
                       with each image's energy pointing game score
    figures.json       what the pictures came from: runs, accuracies, scores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxres import augment, cam_metrics, data, evaluate, gradcam, lr_find, plots, rundir
from jaxres.errors import JaxresError, command_line

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "figures"
DEFAULT_RUNS = REPO_ROOT / "runs" / "figures"
DPI = 90
QUICK_FLAGS = ("--width", "0.25", "--epochs", "4", "--batch-size", "256", "--train-subset", "10000")
SHAPES_FLAGS = ("--data", "shapes", "--width", "0.25", "--epochs", "3", "--batch-size", "256")
CAM_LAYER = "layer3"
LR_RANGE_STEPS = 200  # the default sweep, 1e-4 to 10 (100 steps barely train the model: no divergence to see)


# --------------------------------------------------------------------------- runs


def read_metrics(workdir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one dict per finished epoch); [] when absent."""
    if not (Path(workdir) / rundir.METRICS_NAME).is_file():
        return []
    return rundir.read_metrics(workdir)


def is_finished(workdir: Path) -> bool:
    """True when `workdir` holds a checkpoint and a metrics row for every configured epoch."""
    if not rundir.checkpoint_path(workdir).is_file():
        return False
    return len(read_metrics(workdir)) >= rundir.load_config(workdir).epochs


def train_run(workdir: Path, flags: Sequence[str]) -> Path:
    """Train (or resume, or reuse) `python -m jaxres.train FLAGS --workdir WORKDIR`; returns workdir.

    The subprocess gets this checkout first on its `PYTHONPATH` (and jaxres's XLA defaults
    from its own import of jaxres, `jaxres.runtime`).
    """
    workdir = Path(workdir).resolve()  # the subprocess runs in the repository root
    if is_finished(workdir):
        print(f"reusing the finished run in {workdir}", flush=True)
        return workdir
    command = [sys.executable, "-m", "jaxres.train", *flags, "--workdir", str(workdir)]
    if rundir.checkpoint_path(workdir).is_file():
        command.append("--resume")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    print("$ " + " ".join(command), flush=True)
    completed = subprocess.run(command, env=environment, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise JaxresError(f"training into {workdir} failed (exit status {completed.returncode})")
    return workdir


# --------------------------------------------------------------------------- helpers


def predict_labels(model, variables, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted classes, int64[N], of uint8[N, H, W, 3] images (inference mode, no TTA)."""
    predict = jax.jit(lambda v, x: jnp.argmax(evaluate.predict_logits(model, v, augment.normalize(x)), axis=-1))
    batches = [np.asarray(predict(variables, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(batches)


def one_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first image of each of the first `count` classes present, int64[<= count].

    labels: int[N]. Classes in label order, so the picture is the same on every run.
    """
    classes = np.unique(labels)[:count]
    return np.array([np.flatnonzero(labels == label)[0] for label in classes])


def short_name(name: str) -> str:
    """A class name short enough for a 1-inch title ('automobile' -> 'automob.')."""
    return name if len(name) <= 8 else name[:7] + "."


def image_grid(rows: int, columns: int, cell_inches: float = 1.25, title_inches: float = 0.45) -> tuple[Figure, np.ndarray]:
    """A figure of rows x columns image axes, axis lines off, room for two-line titles."""
    figure = Figure(figsize=(columns * cell_inches, rows * (cell_inches + title_inches)))
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False))
    for each in axes.ravel():
        each.axis("off")
    return figure, axes


def save(figure: Figure, out: Path, name: str) -> Path:
    """Write `figure` as out/name at DPI and print its size."""
    path = plots.save_figure(figure, out / name, dpi=DPI)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)", flush=True)
    return path


# --------------------------------------------------------------------------- figures


def curves_figure(history: Sequence[dict]) -> Figure:
    """`jaxres.plots.plot_training_curves` with whole-epoch ticks (a short run gets no 1.5, 2.5)."""
    figure = plots.plot_training_curves(history)
    for axes in figure.axes:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def misclassified_figure(dataset: data.Dataset, predictions: np.ndarray, count: int = 15, seed: int = 0) -> Figure:
    """A seeded sample of `count` misclassified test images, titled true -> predicted."""
    wrong = np.flatnonzero(predictions != dataset.test.labels)
    chosen = np.sort(np.random.default_rng(seed).choice(wrong, min(count, wrong.size), replace=False))
    return plots.plot_misclassified(
        dataset.test.images[chosen], dataset.test.labels[chosen], predictions[chosen], dataset.class_names
    )


def gradcam_figure(images, cams, true_labels, predicted_labels, class_names: Sequence[str], layer: str) -> Figure:
    """Two rows: the images (titled true / predicted, red when wrong) and their Grad-CAM overlays.

    images: uint8[N, H, W, 3]; cams: float[N, H, W] in [0, 1]; labels: int[N].
    """
    figure, axes = image_grid(2, len(images))
    for column, (image, cam, truth, guess) in enumerate(zip(images, cams, true_labels, predicted_labels)):
        colour = "black" if truth == guess else "darkred"
        axes[0, column].imshow(image, interpolation="nearest")
        axes[0, column].set_title(f"{short_name(class_names[truth])}\n→ {short_name(class_names[guess])}", fontsize=9, color=colour)
        axes[1, column].imshow(gradcam.overlay(image, cam), interpolation="nearest")
    axes[1, 0].set_title("Grad-CAM", fontsize=9, loc="left")
    figure.suptitle(f"Grad-CAM at {layer} of the predicted class (test images, true → predicted)", fontsize=10)
    figure.tight_layout()
    return figure


def shapes_cams_figure(split: data.Split, cams, predicted_labels, scores, class_names: Sequence[str], layer: str, baseline: float) -> Figure:
    """Three rows per image column: the image, its CAM overlay, the CAM with the mask's outline.

    split: the images (uint8[N, H, W, 3]), labels and masks (bool[N, H, W]) shown; cams:
    float[N, H, W] in [0, 1]; scores: float[N], each image's energy pointing game.
    """
    figure, axes = image_grid(3, len(split.images), title_inches=0.35)
    for column in range(len(split.images)):
        truth, guess = int(split.labels[column]), int(predicted_labels[column])
        axes[0, column].imshow(split.images[column], interpolation="nearest")
        axes[0, column].set_title(f"{class_names[truth]}\n→ {class_names[guess]}", fontsize=9, color="black" if truth == guess else "darkred")
        axes[1, column].imshow(gradcam.overlay(split.images[column], cams[column]), interpolation="nearest")
        axes[2, column].imshow(cams[column], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[2, column].contour(split.masks[column].astype(np.float32), levels=[0.5], colors="orange", linewidths=1.5)
        axes[2, column].set_title(f"EPG {scores[column]:.2f}", fontsize=9)
    axes[1, 0].set_title("Grad-CAM", fontsize=9, loc="left")
    figure.suptitle(
        f"Shapes: Grad-CAM at {layer} against the object mask (orange outline); energy pointing game "
        f"mean {np.mean(scores):.2f}, mask-area baseline {baseline:.2f}",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------- the two runs


def quick_start_figures(workdir: Path, out: Path, data_source: str | None) -> dict:
    """curves, misclassified, gradcam and lr_find PNGs of the CIFAR-10 quick-start run."""
    history = read_metrics(workdir)
    if not history:
        raise JaxresError(f"{workdir} has no metrics.jsonl rows: is it a finished jaxres run?")
    model, variables, config = evaluate.load_for_inference(workdir)
    dataset = data.load_dataset(data_source or config.data, cache_dir=config.cache_dir, progress=False)
    save(curves_figure(history), out, "curves.png")

    predictions = predict_labels(model, variables, dataset.test.images)
    save(misclassified_figure(dataset, predictions, seed=config.seed), out, "misclassified.png")

    chosen = one_per_class(dataset.test.labels, 8)
    cams = np.asarray(gradcam.gradcam(model, variables, dataset.test.images[chosen], layer=CAM_LAYER))
    figure = gradcam_figure(
        dataset.test.images[chosen], cams, dataset.test.labels[chosen], predictions[chosen], dataset.class_names, CAM_LAYER
    )
    save(figure, out, "gradcam.png")

    print("running the LR range test of the quick-start config", flush=True)
    range_test = lr_find.range_test_for_config(config, dataset, steps=LR_RANGE_STEPS)
    save(lr_find.plot_lr_range(range_test), out, "lr_find.png")
    return {
        "workdir": str(workdir),
        "config": {key: getattr(config, key) for key in ("data", "width", "epochs", "batch_size", "train_subset", "seed")},
        "test_accuracy": history[-1]["test_accuracy"],
        "recomputed_test_accuracy": float(np.mean(predictions == dataset.test.labels)),
        "gradcam_indices": chosen.tolist(),
        "lr_range_test": {"steps": LR_RANGE_STEPS, "steps_taken": len(range_test.lrs), "suggested_peak_lr": range_test.suggested_lr},
    }


def shapes_figures(workdir: Path, out: Path, count: int = 8) -> dict:
    """shapes_cams PNG of the shapes run: `count` test images, one per class first, then the next."""
    history = read_metrics(workdir)
    model, variables, config = evaluate.load_for_inference(workdir)
    if config.data != "shapes":
        raise JaxresError(f"{workdir} was trained on {config.data!r}; the mask figure needs a run on 'shapes'")
    dataset = data.load_dataset("shapes", progress=False)
    test = dataset.test
    first = one_per_class(test.labels, count).tolist()
    chosen = np.array((first + [i for i in range(len(test.labels)) if i not in first])[:count])
    shown = data.Split(test.images[chosen], test.labels[chosen], test.masks[chosen])
    cams = np.asarray(gradcam.gradcam(model, variables, shown.images, layer=CAM_LAYER))
    scores = np.asarray(cam_metrics.energy_pointing_game(cams, shown.masks, per_image=True))
    baseline = float(cam_metrics.pointing_game_baseline(shown.masks))
    predictions = predict_labels(model, variables, test.images)
    figure = shapes_cams_figure(shown, cams, predictions[chosen], scores, dataset.class_names, CAM_LAYER, baseline)
    save(figure, out, "shapes_cams.png")
    return {
        "workdir": str(workdir),
        "config": {key: getattr(config, key) for key in ("data", "width", "epochs", "batch_size", "seed")},
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "recomputed_test_accuracy": float(np.mean(predictions == test.labels)),
        "indices": chosen.tolist(),
        "energy_pointing_game": [float(score) for score in scores],
        "pointing_game_baseline": baseline,
    }


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick-workdir", type=Path, help="a finished quick-start run (default: train one into RUNS/quick)")
    parser.add_argument("--shapes-workdir", type=Path, help="a finished shapes run (default: train one into RUNS/shapes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"where runs are trained when no workdir is given (default: {DEFAULT_RUNS.relative_to(REPO_ROOT)})")
    parser.add_argument("--data", help="CIFAR-10 source of the quick-start run (default: the copy beside the project when "
                        "training, the run's own source when --quick-workdir is given)")
    return parser


@command_line
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick_workdir or train_run(args.runs / "quick", ("--data", args.data or str(DEFAULT_DATA), *QUICK_FLAGS))
    shapes = args.shapes_workdir or train_run(args.runs / "shapes", SHAPES_FLAGS)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": "python -m benchmarks.figures " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick_start": quick_start_figures(Path(quick), args.out, args.data),
        "shapes": shapes_figures(Path(shapes), args.out),
    }
    (args.out / "figures.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({name: part["test_accuracy"] for name, part in summary.items() if isinstance(part, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
