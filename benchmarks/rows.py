"""The rows of a benchmark result: each task's measurements (through a `processes.Runner`)
turned into a row of per-worker summaries and JAX/PyTorch ratios, or a row that records
why it was skipped or failed. Rows of whole training runs (time to accuracy, the recipe at
convergence) are one `training_row` of a `TrainingRuns`; a resumed run (`Recorded`) keeps
the complete rows and the training runs its results file recorded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path

from benchmarks import common
from benchmarks.plans import Plan
from benchmarks.processes import Runner, WorkerError

BUDGET_USED_UP = "time budget used up"  # why a row was skipped when the plan's time budget ran out


def peak_memory_mib(record: dict, device: str) -> float | None:
    """The peak memory a worker reported: the device's on a GPU, the host's resident set on a CPU."""
    if device == "gpu":
        return record.get("device_peak_mib")
    return record.get("peak_rss_mib")


def memory_of(worker_result: dict, device: str) -> float | None:
    """`peak_memory_mib` of a repeated task's 'finished' message."""
    return peak_memory_mib(worker_result.get("memory", {}), device)


def skipped_row(task: str, name: str, setting: dict, reason: str) -> dict:
    """The row of a measurement that did not run, with the reason."""
    return {"task": task, "name": name, "setting": setting, "skipped": reason}


def train_setting(plan: Plan, width: float, batch: int, precision: str) -> dict:
    """The setting a train row records (and its workers take as flags)."""
    return {"width": width, "batch": batch, "precision": precision, "steps": plan.steps_for(width, batch)}


def summarize_workers(raw: dict, device: str, reference: str = "jax") -> tuple[dict, dict, dict]:
    """Per-worker summaries, pairwise throughput ratios (reference / other) and memory ratios."""
    workers, ratios, memory_ratios = {}, {}, {}
    for label, result in raw.items():
        measurements = result["measurements"]
        ready = dict(result["ready"])
        ready.pop("event", None)
        steady = [m["seconds"] for m in measurements]
        warm_extra = ready.get("first_call_seconds", 0.0) - (sorted(steady)[len(steady) // 2] if steady else 0.0)
        workers[label] = {
            **ready,
            "throughput": common.summarize(common.throughputs(measurements)),
            "seconds": common.summarize(steady),
            "images_per_measure": measurements[0]["images"],
            "first_call_overhead_seconds": warm_extra,
            "memory_mib": memory_of(result, device),
            "memory": {k: v for k, v in result.get("memory", {}).items() if k != "event"},
            "losses": [m["loss"] for m in measurements if "loss" in m],
        }
        if all("other_cpu_cores" in m for m in measurements):
            workers[label]["other_cpu_cores"] = common.summarize([m["other_cpu_cores"] for m in measurements])
            workers[label]["worker_cpu_cores"] = common.summarize([m["worker_cpu_cores"] for m in measurements])
    if reference in workers:
        for label in workers:
            if label == reference:
                continue
            ratios[f"{reference}/{label}"] = common.ratio_summary(
                workers[reference]["throughput"]["values"], workers[label]["throughput"]["values"]
            )
            a, b = workers[reference]["memory_mib"], workers[label]["memory_mib"]
            if common.is_number(a) and common.is_number(b) and b > 0:
                memory_ratios[f"{reference}/{label}"] = a / b
    return workers, ratios, memory_ratios


def one_minute_load() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measured_row(runner: Runner, task: str, name: str, setting: dict, specs: list, recorded: Recorded | None = None) -> dict:
    """Run `specs` ((label, framework, options) per worker) in turn for `task` and summarise them
    into a row: per-worker summaries, JAX/PyTorch ratios, the load average before and after.
    A worker failure gives a row with the error (the suite carries on). A complete row of the
    same setting in `recorded` (a resumed run's) is kept instead."""
    kept = recorded.complete_row(task, name, setting) if recorded else None
    if kept is not None:
        runner.log(f"[{runner.elapsed():6.0f} s] {name}: kept from {recorded.source}")
        return {**kept, "kept_from": kept.get("kept_from", recorded.source)}
    runner.log(f"[{runner.elapsed():6.0f} s] {name}: {', '.join(label for label, _, _ in specs)}")
    load_before = one_minute_load()
    row_started = time.perf_counter()
    try:
        raw = runner.alternate(specs, task, runner.plan.repeats)
    except WorkerError as error:
        runner.row_seconds[task] = time.perf_counter() - row_started
        runner.log(f"    failed: {error}")
        return {"task": task, "name": name, "setting": setting, "error": str(error)}
    runner.row_seconds[task] = time.perf_counter() - row_started
    workers, ratios, memory_ratios = summarize_workers(raw, runner.plan.device)
    for label, ratio in ratios.items():
        runner.log(f"    {label}: throughput ratio {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})")
    return {
        "task": task,
        "name": name,
        "setting": setting,
        "workers": workers,
        "ratios": ratios,
        "memory_ratios": memory_ratios,
        "load_average": [load_before, one_minute_load()],
    }


def parity_row(runner: Runner, width: float, weights: Path, save_weights: bool = True) -> dict:
    """Compare both frameworks on the same weights at `width` (the PyTorch worker creates
    `weights` first, unless `save_weights` is False: a resumed run's existing weights): max
    logit difference, argmax agreement, Grad-CAM difference, passed, the weights' digest."""
    import numpy as np

    options = {"width": width, "weights": weights}
    torch_result = runner.one_shot("torch", "torch", "parity", {**options, "save_weights": save_weights})
    jax_result = runner.one_shot("jax", "jax", "parity", options)
    torch_logits, jax_logits = np.asarray(torch_result["logits"]), np.asarray(jax_result["logits"])
    scale = float(np.abs(torch_logits).max())
    difference = float(np.abs(torch_logits - jax_logits).max())
    agree = torch_logits.argmax(1) == jax_logits.argmax(1)
    cams_torch, cams_jax = np.asarray(torch_result["cams"]), np.asarray(jax_result["cams"])
    same_class = agree[: len(cams_torch)]
    cam_difference = float(np.abs(cams_torch - cams_jax)[same_class].max()) if same_class.any() else None
    relative = difference / max(scale, 1e-12)
    return {
        "task": "parity",
        "width": width,
        "images": int(len(torch_logits)),
        "max_abs_logit": scale,
        "max_abs_difference": difference,
        "relative_difference": relative,
        "argmax_agreement": float(agree.mean()),
        "cam_max_abs_difference": cam_difference,
        "tolerance": runner.plan.parity_tolerance,
        "passed": bool(relative <= runner.plan.parity_tolerance and agree.all()),
        "parameters": torch_result.get("parameters"),
        "weights_digest": common.weights_digest(weights),
        "weights_created": save_weights,
    }


def train_rows(runner: Runner, weights_for, recorded: Recorded | None = None) -> list[dict]:
    """One train row per width, batch and precision (jaxres against PyTorch's device pipeline,
    and the DataLoader pipeline on the plan's `loader_rows`), then the torch.compile row if planned."""
    plan, rows, first = runner.plan, [], True
    for width in plan.widths:
        for batch in plan.batches:
            for precision in plan.precisions:
                setting = train_setting(plan, width, batch, precision)
                name = f"train w{width:g} b{batch} {precision}"
                if runner.over_budget("train"):
                    rows.append(skipped_row("train", name, setting, BUDGET_USED_UP))
                    continue
                options = {**setting, "weights": weights_for(width)}
                specs = [("jax", "jax", options), ("torch-device", "torch", {**options, "pipeline": "device"})]
                if plan.loader_rows == "all" or first:
                    specs.append(("torch-loader", "torch", {**options, "pipeline": "loader", "loader_workers": plan.loader_workers}))
                row = measured_row(runner, "train", name, setting, specs, recorded)
                if first and "workers" in row and "kept_from" not in row:
                    row["workers"]["jax"]["second_run"] = second_run_first_call(runner, "train", options)
                first = False
                rows.append(row)
    if plan.torch_compile_rows == "last" and plan.widths and plan.batches and plan.precisions:
        width, batch, precision = plan.widths[0], plan.batches[0], plan.precisions[0]
        setting = train_setting(plan, width, batch, precision)
        name = f"train w{width:g} b{batch} {precision} torch.compile"
        if runner.over_budget("train-compile"):
            rows.append(skipped_row("train", name, setting, BUDGET_USED_UP))
        else:
            options = {**setting, "weights": weights_for(width)}
            specs = [("jax", "jax", options), ("torch-compile", "torch", {**options, "pipeline": "device", "torch_compile": True})]
            rows.append(measured_row(runner, "train", name, setting, specs, recorded))
    return rows


def second_run_first_call(runner: Runner, task: str, options: dict) -> dict:
    """{first_call_seconds, compile_seconds, first_call_overhead_seconds} of a fresh jaxres
    worker for a setting already measured: as a second run of the same command, it finds
    the compiled programs in the persistent compilation cache. Errors are recorded."""
    worker = runner.start("jax-second-run", "jax", task, {**options, "warmup": 1})
    try:
        ready = worker.read(runner.timeout)
        worker.send("finish")
        worker.read(runner.timeout)
    except WorkerError as error:
        return {"error": str(error)}
    finally:
        worker.close()
    return {name: ready.get(name) for name in ("first_call_seconds", "compile_seconds")}


def eval_rows(runner: Runner, weights_for, recorded: Recorded | None = None) -> list[dict]:
    """One eval row per eval width and precision."""
    plan, rows = runner.plan, []
    for width in plan.eval_widths:
        for precision in plan.eval_precisions:
            setting = {"width": width, "precision": precision, "eval_images": plan.eval_images, "eval_batch": plan.eval_batch}
            name = f"eval w{width:g} {precision}"
            if runner.over_budget("eval"):
                rows.append(skipped_row("eval", name, setting, BUDGET_USED_UP))
                continue
            options = {**setting, "weights": weights_for(width)}
            specs = [("jax", "jax", options), ("torch", "torch", options)]
            rows.append(measured_row(runner, "eval", name, setting, specs, recorded))
    return rows


def gradcam_rows(runner: Runner, weights_for, recorded: Recorded | None = None) -> list[dict]:
    """One Grad-CAM row (layer3, predicted class) per Grad-CAM width."""
    plan, rows = runner.plan, []
    for width in plan.gradcam_widths:
        setting = {"width": width, "gradcam_images": plan.gradcam_images, "gradcam_batch": plan.gradcam_batch, "layer": "layer3"}
        name = f"gradcam w{width:g}"
        if runner.over_budget("gradcam"):
            rows.append(skipped_row("gradcam", name, setting, BUDGET_USED_UP))
            continue
        options = {**setting, "weights": weights_for(width)}
        options.pop("layer")
        specs = [("jax", "jax", options), ("torch", "torch", options)]
        rows.append(measured_row(runner, "gradcam", name, setting, specs, recorded))
    return rows


@dataclasses.dataclass(frozen=True)
class TrainingRuns:
    """A row of whole training runs, each framework once per seed from the same weights: time
    to accuracy (`accuracy_runs`) and the recipe at convergence (`converged_runs`)."""

    task: str  # the plan's task name, and the row's
    name: str
    width: float
    epochs: int
    subset: int | None  # train images (None: all)
    batch: int
    precision: str
    target: float | None  # report the time to reach this test accuracy
    seeds: int  # run r uses seed r (data order, augmentation, train subset) on both sides
    tta: str = "none"  # also evaluate the final model with this test-time augmentation

    def setting(self) -> dict:
        """What the row records as its setting (a resumed run keeps recorded runs of the same one)."""
        setting = {
            "width": self.width,
            "epochs": self.epochs,
            "train_subset": self.subset,
            "batch": self.batch,
            "precision": self.precision,
            "target": self.target,
            "repeats": self.seeds,
            "seeds": list(range(self.seeds)),
        }
        if self.tta != "none":
            setting["tta"] = self.tta
        return setting

    def options(self, weights: Path) -> dict:
        """The workers' `accuracy` task flags (less the seed)."""
        options = {
            "width": self.width,
            "epochs": self.epochs,
            "train_subset": self.subset,
            "accuracy_batch": self.batch,
            "precision": self.precision,
            "target": self.target,
            "weights": weights,
        }
        if self.tta != "none":
            options["tta"] = self.tta
        return options


def accuracy_runs(plan: Plan) -> TrainingRuns:
    """The time-to-accuracy row of `plan` (`accuracy_*` fields)."""
    return TrainingRuns(
        "accuracy", f"time to accuracy w{plan.accuracy_width:g} {plan.accuracy_epochs} epochs", plan.accuracy_width,
        plan.accuracy_epochs, plan.accuracy_subset, plan.accuracy_batch, plan.accuracy_precision, plan.accuracy_target,
        plan.accuracy_repeats,
    )  # fmt: skip


def converged_runs(plan: Plan) -> TrainingRuns:
    """The converged row of `plan` (`converged_*` fields): fp32, no target, final accuracy with TTA too."""
    return TrainingRuns(
        "converged", f"converged w{plan.converged_width:g} {plan.converged_epochs} epochs", plan.converged_width,
        plan.converged_epochs, plan.converged_subset, plan.converged_batch, "fp32", None, plan.converged_seeds,
        plan.converged_tta,
    )  # fmt: skip


def paired_difference(first: list[float], second: list[float]) -> dict:
    """{mean, standard_error (None for one pair), values} of first[i] - second[i]."""
    values = [float(a) - float(b) for a, b in zip(first, second, strict=True)]
    mean = statistics.fmean(values)
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": mean, "standard_error": error, "values": values}


def training_row(runner: Runner, spec: TrainingRuns, weights_for, data_reason: str | None,
                 recorded: Recorded | None = None, checkpoint=None) -> dict:
    """Each framework trains from the same weights in turn, once per seed (seed r: data order,
    augmentation, train subset, the same subset on both sides), each with a cold compilation
    cache (each jaxres run compiles, as a first run does); skipped (with `data_reason`) without
    the real CIFAR-10 copy.

    recorded: a resumed results file's rows; its runs of this row (same setting, same
    weights) are kept, not run again. checkpoint(row): called with the row so far (marked
    incomplete) after every run, to write the results file."""
    setting = spec.setting()
    if data_reason:
        return skipped_row(spec.task, spec.name, setting, data_reason)
    weights = weights_for(spec.width)
    digest = common.weights_digest(weights)
    options = spec.options(weights)
    kept = (recorded or Recorded()).runs(spec.task, spec.name, setting, digest)
    runs = {"jax": [], "torch": []}
    total = 2 * spec.seeds

    def row_so_far(error: str) -> dict:
        return {"task": spec.task, "name": spec.name, "setting": setting, "error": error, "runs": runs}

    runner.log(f"[{runner.elapsed():6.0f} s] {spec.name} (each framework in turn, {spec.seeds} run(s) each"
               + (f", {len(kept)} kept from {recorded.source}" if kept else "") + ")")
    try:
        for seed in range(spec.seeds):
            runner.fresh_compilation_cache()
            for framework in ("jax", "torch"):
                if (framework, seed) in kept:
                    runs[framework].append(kept[(framework, seed)])
                    runner.log(f"    {framework} seed {seed}: kept from {recorded.source}")
                    continue
                result = runner.one_shot(
                    framework, framework, "accuracy", {**options, "seed": seed}, timeout=max(runner.timeout, 36000)
                )
                result.pop("event", None)
                result["seed"] = seed
                result["weights_digest"] = digest
                runs[framework].append(result)
                tta = f", with TTA {result['final_tta_accuracy']:.4f}" if "final_tta_accuracy" in result else ""
                runner.log(f"    {framework} seed {seed}: accuracy {result['final_accuracy']:.4f}{tta}, wall {result['wall_seconds']:.1f} s")
                if checkpoint is not None:
                    done = len(runs["jax"]) + len(runs["torch"])
                    checkpoint(row_so_far(f"incomplete: {done} of {total} runs recorded (continue with --resume)"))
    except WorkerError as error:
        runner.log(f"    failed: {error}")
        return row_so_far(str(error))
    return summarize_training_runs(spec, runs, runner.plan.device)


def summarize_training_runs(spec: TrainingRuns, runs: dict, device: str) -> dict:
    """The row of complete `runs` ({framework: [run per seed]}): per-framework summaries, the
    per-seed wall ratios, and the paired (per-seed) jaxres - PyTorch accuracy differences."""
    walls = {f: [r["wall_seconds"] for r in runs[f]] for f in runs}
    ratios = {"wall_seconds jax/torch": common.ratio_summary(walls["jax"], walls["torch"])}
    targets = [(a["seconds_to_target"], b["seconds_to_target"]) for a, b in zip(runs["jax"], runs["torch"])]
    if spec.target is not None and all(a is not None and b is not None for a, b in targets):
        ratios["seconds_to_target jax/torch"] = common.ratio_summary([a for a, _ in targets], [b for _, b in targets])
    accuracies = ["final_accuracy"] + (["final_tta_accuracy"] if spec.tta != "none" else [])
    workers = {}
    for f in runs:
        workers[f] = {
            "final_accuracy": common.summarize([r["final_accuracy"] for r in runs[f]]),
            "wall_seconds": common.summarize(walls[f]),
            "seconds_to_target": [r["seconds_to_target"] for r in runs[f]],
            "train_images": runs[f][0]["train_images"],
            "test_images": runs[f][0]["test_images"],
            "memory_mib": peak_memory_mib(runs[f][0], device),
            "compile_seconds": runs[f][0].get("compile_seconds"),
        }
        if spec.tta != "none":
            workers[f]["final_tta_accuracy"] = common.summarize([r["final_tta_accuracy"] for r in runs[f]])
    return {
        "task": spec.task,
        "name": spec.name,
        "setting": spec.setting(),
        "runs": runs,
        "workers": workers,
        "ratios": ratios,
        "paired_difference": {
            name: paired_difference([r[name] for r in runs["jax"]], [r[name] for r in runs["torch"]]) for name in accuracies
        },
    }


class Recorded:
    """The rows of the results file a run resumes (`benchmarks.run --resume`; empty for a new
    run): a complete row of the same task, name and setting is kept whole, the runs of a
    training row one by one. `kept` lists what was kept, for the results' record."""

    def __init__(self, rows: list[dict] = (), source: str | None = None, parity: list[dict] = ()):
        self.rows = list(rows)
        self.source = source
        self.parity = list(parity)  # the recorded parity checks (each with its weights' digest)
        self.kept: list[str] = []

    def matching(self, task: str, name: str, setting: dict) -> list[dict]:
        return [r for r in self.rows if r.get("task") == task and r.get("name") == name and r.get("setting") == setting]

    def complete_row(self, task: str, name: str, setting: dict) -> dict | None:
        """The recorded row, if it was measured to the end (not skipped, not failed)."""
        for row in self.matching(task, name, setting):
            if "workers" in row and "error" not in row and "skipped" not in row:
                self.kept.append(name)
                return row
        return None

    def runs(self, task: str, name: str, setting: dict, weights_digest: str) -> dict:
        """{(framework, seed): run} of the recorded training row (complete or not) whose runs
        started from the same weights (`common.weights_digest`)."""
        kept = {}
        for row in self.matching(task, name, setting):
            for framework, runs in row.get("runs", {}).items():
                for run in runs:
                    if run.get("weights_digest") == weights_digest:
                        kept[(framework, run["seed"])] = {**run, "kept_from": run.get("kept_from", self.source)}
        self.kept += [f"{name}: {framework} seed {seed}" for framework, seed in sorted(kept)]
        return kept
