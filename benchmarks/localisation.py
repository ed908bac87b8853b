"""Localisation and faithfulness of every CAM method at every stage, on `shapes`.

    python -m benchmarks.localisation --workdir RUN [--images 500] [--out benchmarks/results/localisation.json]

RUN is a run trained on the synthetic `shapes` source (`python -m jaxres.train --data
shapes ...`), whose test images come with object masks. For each method and layer it
reports the energy pointing game (share of CAM energy inside the object; a uniform or
random map scores the mask-area baseline) and, at the model's last stage, deletion and
insertion AUCs of the target probability (lower deletion / higher insertion = more
faithful). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxres import cam_metrics, data, evaluate, gradcam
from jaxres.errors import JaxresError


def evaluate_localisation(model, variables, split: data.Split, count: int, batch_size: int = 250) -> dict:
    """Pointing game per (method, layer) and deletion/insertion per method at the last stage."""
    images, masks = split.images[:count], split.masks[:count]
    rows = []
    last = model.STAGES[-1]
    for layer in model.STAGES:
        for method in gradcam.METHODS:
            cams = np.concatenate(
                [
                    np.asarray(gradcam.gradcam(model, variables, images[i : i + batch_size], layer=layer, method=method))
                    for i in range(0, len(images), batch_size)
                ]
            )
            row = {"layer": layer, "method": method, "pointing_game": float(cam_metrics.energy_pointing_game(cams, masks))}
            if layer == last:
                scores = cam_metrics.deletion_insertion(model, variables, images, cams, steps=16)
                row["deletion_auc"] = float(np.mean(scores.deletion))
                row["insertion_auc"] = float(np.mean(scores.insertion))
            rows.append(row)
    return {"images": int(len(images)), "baseline": float(cam_metrics.pointing_game_baseline(masks)), "rows": rows}


def markdown(report: dict) -> str:
    lines = [
        f"Energy pointing game on {report['images']} `shapes` test images "
        f"(uniform/random-map baseline = mask area = {report['baseline']:.3f}):",
        "",
        "| layer | " + " | ".join(gradcam.METHODS) + " |",
        "|---|" + "---|" * len(gradcam.METHODS),
    ]
    for layer in dict.fromkeys(row["layer"] for row in report["rows"]):
        cells = [f"{row['pointing_game']:.3f}" for row in report["rows"] if row["layer"] == layer]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    faithful = [row for row in report["rows"] if "deletion_auc" in row]
    if faithful:
        lines += ["", f"Deletion / insertion AUC of the target probability at {faithful[0]['layer']}:", ""]
        lines += ["| method | deletion (lower is better) | insertion (higher is better) |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} |" for r in faithful]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.localisation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run trained with --data shapes")
    parser.add_argument("--images", type=int, default=500, help="number of test images to score")
    parser.add_argument("--out", default="benchmarks/results/localisation.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    try:
        model, variables, config = evaluate.load_for_inference(args.workdir)
        if config.data != "shapes":
            raise JaxresError(f"{args.workdir} was trained on {config.data!r}; localisation needs a run on 'shapes'")
        dataset = data.load_dataset("shapes", progress=False)
        started = time.perf_counter()
        report = evaluate_localisation(model, jax.device_get(variables), dataset.test, args.images)
        report["seconds"] = time.perf_counter() - started
        report["workdir"] = str(args.workdir)
    except JaxresError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
