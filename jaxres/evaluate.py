"""Evaluate a trained run on its test split, with and without test-time augmentation.

    python -m jaxres.evaluate --workdir RUN [--data SOURCE] [--tta none flip flip_translate]

Prints one line per TTA mode: test loss and accuracy on the whole test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax

from jaxres import checkpoint, train
from jaxres.config import TTA_MODES
from jaxres.errors import JaxresError, command_line


def check_dataset_matches_run(dataset, info: dict, workdir) -> None:
    """Raise JaxresError unless `dataset` (a jaxres.data.Dataset) is of the kind the run in
    `workdir` was trained on: the same class names in the same order (the labels mean the
    same) and the same image shape [H, W, 3]. info: the run's dataset.json
    (`train.read_dataset_info`). Names which differs, showing both."""
    where = f"the data ({dataset.source}) do not fit the run in {workdir} (trained on {info.get('source', '?')})"
    run_names, data_names = list(info.get("class_names", [])), list(dataset.class_names)
    if run_names != data_names:
        raise JaxresError(f"{where}: class names differ: the run has {run_names}, the data have {data_names}")
    run_shape = tuple(info.get("image_shape", ()))
    for split in (dataset.train, dataset.test):
        data_shape = tuple(split.images.shape[1:])
        if data_shape != run_shape:
            raise JaxresError(f"{where}: image shape differs: the run's images are {_shape(run_shape)}, these are {_shape(data_shape)}")


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def load_run_and_data(workdir, data: str | None = None, cache_dir: str | None = None):
    """(model, variables, config, dataset) of the trained run in `workdir` and the dataset
    `data` (default: the one it was trained on; cache_dir: default the run's), checked with
    `check_dataset_matches_run` before anything is computed. config.data and
    config.cache_dir are the ones used."""
    model, variables, config = checkpoint.load_for_inference(workdir)
    config = dataclasses.replace(config, data=data or config.data, cache_dir=cache_dir or config.cache_dir)
    dataset = train.load_data(config, progress=sys.stderr.isatty())
    check_dataset_matches_run(dataset, train.read_dataset_info(workdir), workdir)
    return model, variables, config, dataset


def evaluate_run(workdir, data: str | None = None, tta_modes=TTA_MODES, cache_dir: str | None = None) -> dict:
    """{tta mode: {"loss", "accuracy"}} for the run in `workdir` on its test split.

    data: the dataset source (default: the one the run was trained on); it must have the
    run's class names and image shape (JaxresError otherwise).
    """
    model, variables, config, dataset = load_run_and_data(workdir, data, cache_dir)
    mesh = train.make_mesh()
    images = train.replicate(mesh, dataset.test.images)
    labels = train.replicate(mesh, dataset.test.labels)
    variables = train.replicate_tree(mesh, variables)
    results = {}
    for mode in tta_modes:
        evaluation = jax.device_get(train.make_evaluate(model, config, mesh, tta=mode)(variables, images, labels))
        results[mode] = {"loss": float(evaluation["loss"]), "accuracy": float(evaluation["accuracy"])}
    return results


@command_line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxres.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run directory written by python -m jaxres.train")
    parser.add_argument("--data", help="dataset source (default: the run's own); it must have the run's classes and image size")
    parser.add_argument("--cache-dir", help="decoded-array cache (default: the run's)")
    parser.add_argument("--tta", nargs="+", default=list(TTA_MODES), choices=TTA_MODES, help="TTA modes to compare")
    args = parser.parse_args(argv)
    results = evaluate_run(args.workdir, args.data, args.tta, args.cache_dir)
    baseline = results.get("none")
    print(f"{'tta':<16}{'test_loss':>10}{'test_acc':>10}{'gain':>8}")
    for mode, result in results.items():
        gain = f"{100 * (result['accuracy'] - baseline['accuracy']):+.2f}" if baseline else ""
        print(f"{mode:<16}{result['loss']:>10.4f}{100 * result['accuracy']:>9.2f}%{gain:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
