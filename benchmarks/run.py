"""jaxres against PyTorch, side by side: `python -m benchmarks.run [--quick]`.

Each framework runs in its own worker process (`benchmarks.worker`) with the same thread
count and the same cores. For every configuration the workers start one after another
(so neither compiles while the other is measured), warm up (the first call, compilation
included, is reported apart), then take turns: A B A B ... for `--repeats` measurements.
Each pair gives one JAX/PyTorch ratio; the tables show the median and min-max of those
ratios next to each side's median and min-max.

Before any timing, both sides load the same weights (a PyTorch-initialised model with
calibrated BatchNorm statistics, into jaxres through `jaxres.convert.torch_to_flax`) and
their logits and Grad-CAM maps on the same test images are compared.

Suites:
  cpu (default without an NVIDIA GPU): fp32; `--quick` is width 0.25, batch 128, a few
      minutes on a 2-core CPU; the full suite is widths 0.25 and 1.0, batches 128 and 512,
      a width-0.25 time-to-accuracy run on all 50,000 images for 4 epochs, and last the
      recipe at convergence (width 0.25, 24 epochs, all images, batch 512, two seeds per
      framework, final accuracy without and with the flip TTA; `--tasks converged` alone).
      That takes hours on a 2-core CPU: the results file is written after every run, and
      `--resume benchmarks/results/NAME.json` continues an interrupted run, keeping the rows
      and runs it recorded.
  gpu (`benchmarks/gpu.sh`): fp32, bf16 and fp16, the full 24-epoch recipe in both
      frameworks (target 94%), within `--budget-seconds` (lower-priority rows are
      skipped, with the reason recorded, when the budget runs out).

Outputs: benchmarks/results/<name>.json and benchmarks/results/latest.json, a markdown table on stdout,
benchmarks/results/ratios.png, benchmarks/results/README_results.md (see `benchmarks.report`). Worker logs and
the shared weights go to benchmarks/results/tmp/ (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.plans import OVERRIDABLE_FIELDS, TASK_NAMES, Plan, make_plan, plan_from_record
from benchmarks.processes import Runner
from benchmarks.rows import (
    BUDGET_USED_UP, Recorded, accuracy_runs, converged_runs, eval_rows, gradcam_rows, parity_row, train_rows, training_row,
)  # fmt: skip

# The parts, each importing only those before it: benchmarks.plans (what a run measures),
# benchmarks.processes (the worker processes and their protocol), benchmarks.rows (measurements
# into result rows and ratios), benchmarks.report (tables and chart); here: the command line,
# the order of the tasks, the results file.


def resolve_data(path: str | None, cache_dir: str | None, log=print) -> tuple[str, dict, str | None]:
    """(worker --data value, data record, reason the accuracy rows are skipped or None)."""
    source = Path(path) if path else common.DEFAULT_DATA
    if path == "synthetic" or not source.exists():
        reason = (
            f"the CIFAR-10 copy was not found at {source}; throughput used seeded synthetic images "
            "and time to accuracy was skipped"
        )
        if path == "synthetic":
            reason = "--data synthetic: time to accuracy needs the real CIFAR-10 copy"
        return "synthetic", {"source": "synthetic", "reason": reason}, reason
    from jaxres.data import load_dataset  # NumPy + Pillow: decodes once into the cache the workers read

    started = time.perf_counter()
    dataset = load_dataset(str(source), cache_dir=cache_dir, progress=False)
    log(f"data: {dataset.source}: {len(dataset.train)} train / {len(dataset.test)} test images ({time.perf_counter() - started:.1f} s)")
    record = {"source": str(source), "train_images": len(dataset.train), "test_images": len(dataset.test)}
    return str(source), record, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="CPU: width 0.25, batch 128, reduced time to accuracy (a few minutes)")
    p.add_argument("--suite", choices=("cpu", "gpu"), help="default: gpu when nvidia-smi sees a GPU, else cpu")
    p.add_argument("--device", choices=("cpu", "gpu"), help="default: the suite's")
    p.add_argument("--smoke", action="store_true", help="the suite's shape at toy sizes (checks the machinery)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES)
    p.add_argument("--threads", type=int, help="compute threads per worker (default: all available cores)")
    p.add_argument("--repeats", type=int, help="timed measurements per worker, alternating (default 5)")
    p.add_argument("--warmup", type=int, help="untimed measurements first (default 2; the first compiles)")
    p.add_argument("--widths", type=float, nargs="+")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--train-images", type=int, help="images per train measurement (steps = this // batch)")
    p.add_argument("--eval-images", type=int)
    p.add_argument("--gradcam-images", type=int)
    p.add_argument("--loader-workers", type=int, help="DataLoader num_workers of the original-style pipeline")
    p.add_argument("--torch-compile", action="store_true", help="add a last train row: the first setting against torch.compile")
    p.add_argument("--jax-xla-flags", default="", help="extra XLA_FLAGS for the jax workers (an experiment; recorded and shown)")
    p.add_argument("--jax-conv-backend",
                   help="conv_backend of the jax workers: auto (the default), xla or onednn (an experiment; recorded and shown)")
    p.add_argument("--accuracy-width", type=float)
    p.add_argument("--accuracy-epochs", type=int)
    p.add_argument("--accuracy-subset", type=int, help="train images for time to accuracy (default: the mode's)")
    p.add_argument("--accuracy-precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--accuracy-target", type=float)
    p.add_argument("--accuracy-repeats", type=int, help="time-to-accuracy runs per framework, one seed each (default: the mode's)")
    p.add_argument("--converged-width", type=float)
    p.add_argument("--converged-epochs", type=int)
    p.add_argument("--converged-subset", type=int, help="train images for the converged row (default: all)")
    p.add_argument("--converged-batch", type=int)
    p.add_argument("--converged-seeds", type=int, help="converged runs per framework, one seed each (default 2)")
    p.add_argument("--resume", metavar="RESULTS_JSON",
                   help="continue the interrupted run recorded in this file: its plan and name; the rows and the runs of "
                        "training rows it recorded are kept, the rest measured (writes the same file)")
    p.add_argument("--budget-seconds", type=float, help="skip remaining rows after this long (gpu suite: 500)")
    p.add_argument("--data", help="CIFAR-10 source (default: <repo>/../shared/data/cifar10-jpeg.tar.gz), or 'synthetic'")
    p.add_argument("--cache-dir", help="decoded-array cache (default: $JAXRES_CACHE or ~/.cache/jaxres)")
    p.add_argument("--out", help=f"results folder (default: {common.RESULTS_DIR}, or the --resume file's)")
    p.add_argument("--name", help="results file name (default: <suite>-<mode>-<UTC time>)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for any one worker answer")
    p.add_argument("--no-chart", action="store_true")
    return p


def new_results(plan: Plan, args) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = args.name or f"{plan.suite}-{plan.mode}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    return {
        "schema": 1,
        "name": name,
        "created": now.isoformat(timespec="seconds"),
        "suite": plan.suite,
        "mode": plan.mode,
        "device": plan.device,
        "plan": dataclasses.asdict(plan),
        "machine": common.machine_record(),
        "packages": common.package_versions(),
        "git": common.git_commit(),
        "data": None,
        "threads": {
            "per_worker": plan.threads,
            "environment": {k: v for k, v in common.thread_environment(plan.threads, {}).items()},
            "pinning": "each CPU worker pins itself to the first `threads` allowed cores",
        },
        "parity": [],
        "rows": [],
        "notes": [],
    }


def run(plan: Plan, args, results: dict, log=print, recorded: Recorded | None = None) -> dict:
    """Measure everything in `plan`, appending to `results` as it goes (so an interruption
    keeps what was measured) and writing the results file after every task and every run of
    a training row. recorded: the rows of the results file a run resumes (kept, not measured
    again; its weights reused when unchanged)."""
    started = time.perf_counter()
    out_dir = Path(args.out)
    scratch = out_dir / "tmp"
    recorded = recorded or Recorded()
    data, data_record, data_reason = resolve_data(args.data, args.cache_dir, log)
    results["data"] = data_record
    runner = Runner(plan, data, args.cache_dir, scratch, args.timeout, log)
    runner.started = started
    if plan.jax_xla_flags:
        results["notes"].append(f"experiment: the jaxres workers ran with extra XLA_FLAGS `{plan.jax_xla_flags}` (not the default)")
    if plan.jax_conv_backend != "auto":
        results["notes"].append(f"experiment: the jaxres workers ran with conv_backend `{plan.jax_conv_backend}` (not the default auto)")
    if plan.device == "cpu":
        results["notes"].append(
            "CPU: jaxres's 3x3 float32 convolutions are oneDNN's where its library builds (conv_backend auto, "
            "jaxres/onednn.py): all of them with oneDNN's AVX-512 kernels, those of at most 128 x 128 channels with "
            "its AVX2 ones, the others XLA's; bf16 ones are oneDNN's where its bfloat16 kernels are native (AMX, "
            "AVX512-BF16), else XLA's; an epoch (or evaluation) whose step has "
            "no XLA convolution left runs as one lax.scan, else as a host loop over the jitted step, since XLA:CPU's "
            "own convolutions inside lax.scan are much slower (jax-ml/jax#12868; epoch_loop auto, each row records "
            "the loop it ran in)."
        )
    weights = {}
    previous_digests = {p["width"]: p.get("weights_digest") for p in recorded.parity}

    def weights_for(width: float) -> Path:
        if width not in weights:
            path = scratch / "weights" / f"custom_resnet_w{width:g}.npz"
            # a resumed run keeps the weights its recorded runs started from, when they are still there
            reuse = path.is_file() and previous_digests.get(width) == common.weights_digest(path)
            row = parity_row(runner, width, path, save_weights=not reuse)
            results["parity"].append(row)
            status = "ok" if row["passed"] else "MISMATCH"
            log(
                f"[{runner.elapsed():6.0f} s] parity w{width:g}: max |logit diff| {row['max_abs_difference']:.2e} "
                f"(relative {row['relative_difference']:.2e}), argmax agreement {row['argmax_agreement']:.3f}, "
                f"Grad-CAM max diff {row['cam_max_abs_difference']}: {status}"
                + ("; the recorded run's weights reused" if reuse else "")
            )
            if not row["passed"]:
                raise SystemExit(f"error: jaxres and PyTorch disagree on the same weights at width {width:g}; not timing")
            if width in previous_digests and not reuse:
                log(f"    the weights at width {width:g} are not the resumed run's: its training runs are measured again")
            weights[width] = path
        return weights[width]

    def training(spec) -> None:
        """The row of `spec` in the results' next slot: the row so far after every run, then the row."""
        slot = len(results["rows"])

        def checkpoint(row: dict) -> None:
            results["rows"][slot:] = [row]
            write_results_file(results, out_dir)

        results["rows"][slot:] = [training_row(runner, spec, weights_for, data_reason, recorded, checkpoint)]

    for task in plan.tasks:
        if task == "parity":
            needed = plan.widths + plan.eval_widths + plan.gradcam_widths
            if "accuracy" in plan.tasks:
                needed.append(plan.accuracy_width)
            if "converged" in plan.tasks:
                needed.append(plan.converged_width)
            widths = sorted(set(needed), reverse=True)
            for width in widths:
                weights_for(width)
        elif task == "train":
            results["rows"] += train_rows(runner, weights_for, recorded)
        elif task == "eval":
            results["rows"] += eval_rows(runner, weights_for, recorded)
        elif task == "gradcam":
            results["rows"] += gradcam_rows(runner, weights_for, recorded)
        elif task in ("accuracy", "converged"):
            spec = accuracy_runs(plan) if task == "accuracy" else converged_runs(plan)
            if runner.over_budget():
                results["rows"].append({"task": task, "name": spec.name, "skipped": BUDGET_USED_UP})
            else:
                training(spec)
        write_results_file(results, out_dir)
    results["duration_seconds"] = runner.elapsed()
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def write_json(text: str, path: Path) -> None:
    """`text` into `path` atomically (a temporary file beside it, then a rename)."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results_file(results: dict, out_dir: Path) -> Path:
    """The results as `out_dir/<name>.json`, atomically (the checkpoint of a run in progress)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results['name']}.json"
    write_json(json.dumps(results, indent=1), path)
    return path


def write_outputs(results: dict, out_dir: Path, chart: bool = True) -> list[Path]:
    from benchmarks import report

    paths = [write_results_file(results, out_dir), out_dir / "latest.json"]
    write_json(paths[0].read_text(), paths[1])
    readme = out_dir / "README_results.md"
    readme.write_text(report.readme_section(results, chart_path="benchmarks/results/ratios.png"))
    paths.append(readme)
    if chart:
        chart_path = out_dir / "ratios.png"
        if report.plot_ratios(results, chart_path):
            paths.append(chart_path)
    return paths


# the flags that choose or change the plan (and the results' name): a resumed run takes them from its file
PLAN_FLAGS = (
    "quick", "suite", "device", "smoke", "tasks", "threads", "widths", "batches", "precisions", "train_images",
    "torch_compile", "jax_xla_flags", "jax_conv_backend", "name", *OVERRIDABLE_FIELDS,
)  # fmt: skip


def resume(args) -> tuple[Plan, dict, Recorded]:
    """(plan, new results, recorded rows) to continue the run recorded in `args.resume`: its
    plan, name and creation time; `resumed` lists each resumption (from which file, when, the
    commit and CPU it was recorded with, what was kept: filled in after the run). Exits with an
    error when the file is missing or a plan flag is given (the plan is the file's)."""
    path = Path(args.resume)
    if not path.is_file():
        raise SystemExit(f"error: --resume {path}: no such results file")
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: --resume {path}: not a results file ({error})") from None
    defaults = build_parser().parse_args([])
    changed = [name for name in PLAN_FLAGS if getattr(args, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise SystemExit(f"error: --resume continues the plan recorded in {path}; drop {flags}")
    plan = plan_from_record(previous["plan"])
    args.name = previous["name"]
    args.out = args.out or str(path.parent)
    results = new_results(plan, args)
    results["created"] = previous["created"]
    results["resumed"] = [*previous.get("resumed", []), {
        "from": str(path),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "previous_git": previous.get("git"),
        "previous_cpu_model": previous.get("machine", {}).get("cpu_model"),
        "previous_duration_seconds": previous.get("duration_seconds"),
        "previous_interrupted": previous.get("interrupted"),
        "kept": [],
    }]  # fmt: skip
    if previous.get("machine", {}).get("cpu_model") != results["machine"]["cpu_model"]:
        results["notes"].append(
            f"resumed on another CPU ({results['machine']['cpu_model']}) than the runs kept from {path.name} "
            f"({previous.get('machine', {}).get('cpu_model')}): their wall times are not comparable"
        )
    recorded = Recorded(previous.get("rows", []), source=path.name, parity=previous.get("parity", []))
    return plan, results, recorded


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    recorded = None
    if args.resume:
        plan, results, recorded = resume(args)
    else:
        plan = make_plan(args)
        args.out = args.out or str(common.RESULTS_DIR)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(plan), indent=1))
        return 0
    print(f"benchmarks: suite {plan.suite}, mode {plan.mode}, device {plan.device}, {plan.threads} thread(s) per worker, "
          f"{plan.repeats} alternating repeats after {plan.warmup} warm-up call(s)"
          + (f"; resuming {args.resume}" if args.resume else ""), flush=True)
    if not args.resume:
        results = new_results(plan, args)
    load = results["machine"].get("load_average_at_start")
    if load and load[0] > 0.5:
        print(f"warning: the 1-minute load average is {load[0]:.2f} before starting: other work on this machine "
              "will be measured too (each row records the CPU other processes used)", flush=True)
    started = time.perf_counter()
    try:
        run(plan, args, results, log=lambda text: print(text, flush=True), recorded=recorded)
    except KeyboardInterrupt:
        results["interrupted"] = (
            f"interrupted after {time.perf_counter() - started:.0f} s; later rows were not measured "
            f"(continue with --resume {Path(args.out) / (results['name'] + '.json')})"
        )
        results["notes"].append(results["interrupted"])
        print(results["interrupted"], file=sys.stderr)
    results.setdefault("duration_seconds", time.perf_counter() - started)
    if recorded is not None:
        results["resumed"][-1]["kept"] = recorded.kept
    from benchmarks import report

    paths = write_outputs(results, Path(args.out), chart=not args.no_chart)
    print()
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [row["name"] for row in results["rows"] if "error" in row]
    if results.get("interrupted"):
        return 130
    if failed:
        print("failed rows: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
