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
from jaxres.errors import JaxresError


def evaluate_run(workdir, data: str | None = None, tta_modes=TTA_MODES, cache_dir: str | None = None) -> dict:
    """{tta mode: {"loss", "accuracy"}} for the run in `workdir` on its test split.

    data: the dataset source (default: the one the run was trained on).
    """
    model, variables, config = checkpoint.load_for_inference(workdir)
    config = dataclasses.replace(config, data=data or config.data, cache_dir=cache_dir or config.cache_dir)
    dataset = train.load_data(config, progress=sys.stderr.isatty())
    mesh = train.make_mesh()
    images = train.replicate(mesh, dataset.test.images)
    labels = train.replicate(mesh, dataset.test.labels)
    variables = train.replicate_tree(mesh, variables)
    results = {}
    for mode in tta_modes:
        evaluation = jax.device_get(train.make_evaluate(model, config, mesh, tta=mode)(variables, images, labels))
        results[mode] = {"loss": float(evaluation["loss"]), "accuracy": float(evaluation["accuracy"])}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxres.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run directory written by python -m jaxres.train")
    parser.add_argument("--data", help="dataset source (default: the run's own)")
    parser.add_argument("--cache-dir", help="decoded-array cache (default: the run's)")
    parser.add_argument("--tta", nargs="+", default=list(TTA_MODES), choices=TTA_MODES, help="TTA modes to compare")
    args = parser.parse_args(argv)
    try:
        results = evaluate_run(args.workdir, args.data, args.tta, args.cache_dir)
    except JaxresError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    baseline = results.get("none")
    print(f"{'tta':<16}{'test_loss':>10}{'test_acc':>10}{'gain':>8}")
    for mode, result in results.items():
        gain = f"{100 * (result['accuracy'] - baseline['accuracy']):+.2f}" if baseline else ""
        print(f"{mode:<16}{result['loss']:>10.4f}{100 * result['accuracy']:>9.2f}%{gain:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
