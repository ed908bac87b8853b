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
      and a width-0.25 time-to-accuracy run on all 50,000 images for 4 epochs.
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
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import common

TASK_NAMES = ("parity", "train", "eval", "gradcam", "accuracy")


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """Everything one run of the suite measures (see `make_plan`)."""

    suite: str  # cpu | gpu
    mode: str  # quick | full | gpu | smoke
    device: str  # cpu | gpu
    threads: int
    repeats: int
    warmup: int
    widths: list[float]
    batches: list[int]
    precisions: list[str]
    train_images_per_measure: dict  # width -> images per measurement (steps = this // batch)
    loader_workers: int
    loader_rows: str  # "all" | "first": which train configurations also time the DataLoader pipeline
    torch_compile_rows: str  # "none" | "last": a last train row, the first setting against torch.compile
    eval_widths: list[float]
    eval_precisions: list[str]
    eval_images: int
    eval_batch: int
    gradcam_widths: list[float]
    gradcam_images: int
    gradcam_batch: int
    accuracy_width: float
    accuracy_epochs: int
    accuracy_subset: int | None
    accuracy_batch: int
    accuracy_precision: str
    accuracy_target: float | None
    accuracy_repeats: int
    tasks: list[str]
    budget_seconds: float | None
    parity_tolerance: float = 1e-4  # max |logit diff| / max |logit|
    jax_xla_flags: str = ""  # extra XLA_FLAGS for the jax workers (an experiment, recorded in the results)

    def steps_for(self, width: float, batch: int) -> int:
        images = self.train_images_per_measure.get(width, self.train_images_per_measure.get("default", 1024))
        return max(1, int(images) // batch)


def make_plan(args) -> Plan:
    suite = args.suite or ("gpu" if common.gpu_info() else "cpu")
    device = args.device or suite
    threads = args.threads or common.available_cores()
    if suite == "gpu":
        plan = Plan(
            suite="gpu",
            mode="gpu",
            device=device,
            threads=threads,
            repeats=5,
            warmup=2,
            widths=[1.0, 0.25],
            batches=[512, 128],
            precisions=["fp16", "bf16", "fp32"],
            train_images_per_measure={"default": 16384},
            loader_workers=min(8, max(1, threads - 1)),
            loader_rows="first",
            torch_compile_rows="last",
            eval_widths=[1.0],
            eval_precisions=["fp32", "bf16", "fp16"],
            eval_images=10000,
            eval_batch=1000,
            gradcam_widths=[1.0],
            gradcam_images=2048,
            gradcam_batch=256,
            accuracy_width=1.0,
            accuracy_epochs=24,
            accuracy_subset=None,
            accuracy_batch=512,
            accuracy_precision="fp16",
            accuracy_target=0.94,
            accuracy_repeats=1,
            tasks=["parity", "accuracy", "train", "eval", "gradcam"],
            budget_seconds=500.0,
        )
    elif args.quick:
        plan = Plan(
            suite="cpu",
            mode="quick",
            device=device,
            threads=threads,
            repeats=5,
            warmup=2,
            widths=[0.25],
            batches=[128],
            precisions=["fp32", "bf16"],
            train_images_per_measure={0.25: 768, "default": 256},
            loader_workers=min(2, threads),
            loader_rows="first",
            torch_compile_rows="none",
            eval_widths=[0.25],
            eval_precisions=["fp32"],
            eval_images=2000,
            eval_batch=500,
            gradcam_widths=[0.25],
            gradcam_images=256,
            gradcam_batch=128,
            accuracy_width=0.25,
            accuracy_epochs=2,
            accuracy_subset=5120,
            accuracy_batch=512,
            accuracy_precision="fp32",
            accuracy_target=None,
            accuracy_repeats=1,
            tasks=list(TASK_NAMES),
            budget_seconds=None,
        )
    else:
        plan = Plan(
            suite="cpu",
            mode="full",
            device=device,
            threads=threads,
            repeats=5,
            warmup=2,
            widths=[0.25, 1.0],
            batches=[128, 512],
            precisions=["fp32", "bf16"],
            train_images_per_measure={0.25: 1024, 1.0: 512, "default": 512},
            loader_workers=min(2, threads),
            loader_rows="all",
            torch_compile_rows="none",
            eval_widths=[0.25, 1.0],
            eval_precisions=["fp32"],
            eval_images=2000,
            eval_batch=500,
            gradcam_widths=[0.25, 1.0],
            gradcam_images=256,
            gradcam_batch=128,
            accuracy_width=0.25,
            accuracy_epochs=4,
            accuracy_subset=None,
            accuracy_batch=512,
            accuracy_precision="fp32",
            accuracy_target=None,
            accuracy_repeats=1,
            tasks=list(TASK_NAMES),
            budget_seconds=None,
        )
    if args.smoke:  # the suite's shape at toy sizes, to check the machinery (e.g. the GPU suite on a CPU)
        plan.mode = "smoke"
        plan.repeats, plan.warmup = 2, 1
        plan.widths = [0.0625]
        plan.eval_widths = [0.0625]
        plan.batches = [32]
        plan.train_images_per_measure = {"default": 64}
        plan.eval_images, plan.eval_batch = 256, 128
        plan.gradcam_widths, plan.gradcam_images, plan.gradcam_batch = [0.0625], 64, 32
        plan.accuracy_width, plan.accuracy_epochs, plan.accuracy_subset, plan.accuracy_batch = 0.0625, 1, 1024, 128
        plan.loader_workers = min(plan.loader_workers, 1)
    if plan.device == "cpu":  # on a CPU: fp32 and bf16 (PyTorch CPU autocast); fp16 only on a GPU
        plan.precisions = [p for p in plan.precisions if p != "fp16"]
        plan.eval_precisions = [p for p in plan.eval_precisions if p == "fp32"]
        plan.accuracy_precision = "fp32"
        plan.torch_compile_rows = "none" if not args.torch_compile else plan.torch_compile_rows
    # explicit overrides
    for name in ("repeats", "warmup", "loader_workers", "accuracy_epochs", "accuracy_subset", "accuracy_width",
                 "accuracy_precision", "accuracy_target", "budget_seconds", "eval_images", "gradcam_images"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(plan, name, value)
    if args.widths:  # every measured width (time to accuracy keeps its own, --accuracy-width)
        plan.widths = plan.eval_widths = plan.gradcam_widths = args.widths
    if args.batches:
        plan.batches = args.batches
    if args.precisions:
        plan.precisions = args.precisions
    if args.train_images:
        plan.train_images_per_measure = {"default": args.train_images}
    if args.tasks:
        plan.tasks = [t for t in TASK_NAMES if t in args.tasks] if plan.suite == "cpu" else [t for t in plan.tasks if t in args.tasks]
    if args.torch_compile and plan.torch_compile_rows == "none":
        plan.torch_compile_rows = "last"
    if args.jax_xla_flags:
        plan.jax_xla_flags = args.jax_xla_flags
    if plan.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    return plan


# --------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    pass


class Worker:
    """One `benchmarks.worker` process and its protocol messages."""

    def __init__(self, label: str, argv: list[str], env: dict, log_path: Path):
        self.label = label
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", *argv],
            cwd=common.REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            message = common.parse_message(line)
            if message is not None:
                self.messages.put(message)
            else:
                self.log.write(line)
        self.messages.put(None)

    def read(self, timeout: float) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"{self.label}: no answer within {timeout:.0f} s (log: {self.log_path})") from None
        if message is None:
            self.process.wait()
            raise WorkerError(f"{self.label}: exited with status {self.process.returncode} (log: {self.log_path})")
        if message.get("event") == "error":
            raise WorkerError(f"{self.label}: {message.get('error')} (log: {self.log_path})")
        return message

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self, timeout: float = 60) -> None:
        try:
            if self.process.stdin and not self.process.stdin.closed:
                self.process.stdin.close()
            self.process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()
        self.log.close()


class ContentionProbe:
    """CPU time that other processes used while one worker was measured.

    `finish()` returns {other_cpu_cores, worker_cpu_cores}: the CPU seconds of the whole
    machine minus those of the worker (and its children, e.g. DataLoader workers), and the
    worker's own, each divided by the wall time. On an idle machine other_cpu_cores is
    about 0; above ~0.25 on a small machine the pair is contaminated by other work.
    Empty without psutil.
    """

    def __init__(self, pid: int):
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.process = psutil.Process(pid)
        self.started = time.perf_counter()
        self.system = self._system()
        self.worker = self._worker()

    def _system(self) -> float:
        times = self.psutil.cpu_times()._asdict()
        idle = ("idle", "iowait", "guest", "guest_nice")  # guest time is already inside user time
        return sum(value for name, value in times.items() if name not in idle)

    def _worker(self) -> float:
        total = 0.0
        try:
            for process in [self.process, *self.process.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        except self.psutil.Error:
            pass
        return total

    def finish(self) -> dict:
        if self.psutil is None:
            return {}
        wall = max(time.perf_counter() - self.started, 1e-9)
        worker = self._worker() - self.worker
        other = max(0.0, self._system() - self.system - worker)
        return {"other_cpu_cores": other / wall, "worker_cpu_cores": worker / wall}


class Runner:
    """Starts workers with the plan's shared settings and runs the measurement protocol."""

    def __init__(self, plan: Plan, data: str, cache_dir: str | None, scratch: Path, timeout: float, log=print):
        self.plan = plan
        self.data = data
        self.cache_dir = cache_dir
        self.scratch = scratch
        self.timeout = timeout
        self.log = log
        self.started = time.perf_counter()
        self.count = 0
        self.row_seconds: dict[str, float] = {"train-compile": 150.0}  # task -> duration of its last row (estimates first)
        self.compilation_cache = scratch / "compilation-cache" / datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self, task: str | None = None) -> bool:
        """True when the budget is spent, or would be by a row of `task` as long as the last one."""
        budget = self.plan.budget_seconds
        if budget is None:
            return False
        expected = self.row_seconds.get(task, 0.0) if task else 0.0
        return self.elapsed() + expected > budget

    def env(self, framework: str) -> dict:
        env = common.thread_environment(self.plan.threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_ROOT), env.get("PYTHONPATH")]))
        if framework == "jax":
            # a persistent compilation cache of this run only: each program's first worker
            # compiles (a first run), later workers of the same setting load it (a second run)
            env["JAXRES_COMPILATION_CACHE"] = str(self.compilation_cache)
            if self.plan.jax_xla_flags:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {self.plan.jax_xla_flags}".strip()
            if self.plan.device == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
            else:  # leave room on the GPU for the PyTorch worker alive at the same time
                env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        else:
            env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.scratch / "inductor-cache"))
        return env

    def argv(self, framework: str, task: str, options: dict) -> list[str]:
        values = {
            "framework": framework,
            "task": task,
            "device": self.plan.device,
            "threads": self.plan.threads,
            "data": self.data,
            "warmup": self.plan.warmup,
            **options,
        }
        if self.cache_dir:
            values["cache_dir"] = self.cache_dir
        argv = []
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            else:
                argv += [flag, str(value)]
        return argv

    def start(self, label: str, framework: str, task: str, options: dict) -> Worker:
        self.count += 1
        log_path = self.scratch / "logs" / f"{self.count:03d}-{task}-{label}.log"
        return Worker(label, self.argv(framework, task, options), self.env(framework), log_path)

    def one_shot(self, label: str, framework: str, task: str, options: dict, timeout: float | None = None) -> dict:
        worker = self.start(label, framework, task, options)
        try:
            return worker.read(timeout or self.timeout)
        finally:
            worker.close()

    def alternate(self, specs: list[tuple[str, str, dict]], task: str, repeats: int) -> dict:
        """Start each (label, framework, options) worker in turn, then A B A B ... measurements.

        Returns {label: {ready, measurements, memory}} for the workers that completed.
        """
        workers, out = [], {}
        try:
            for label, framework, options in specs:
                worker = self.start(label, framework, task, options)
                workers.append(worker)
                out[label] = {"ready": worker.read(self.timeout), "measurements": []}
            for _ in range(repeats):
                for worker in workers:
                    probe = ContentionProbe(worker.process.pid)
                    worker.send("measure")
                    measurement = worker.read(self.timeout)
                    measurement.update(probe.finish())
                    out[worker.label]["measurements"].append(measurement)
            for worker in workers:
                worker.send("finish")
                out[worker.label]["memory"] = worker.read(self.timeout)
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        finally:
            for worker in workers:
                worker.close()
        return out


# --------------------------------------------------------------------------- rows


def memory_of(worker_result: dict, device: str) -> float | None:
    memory = worker_result.get("memory", {})
    if device == "gpu":
        return memory.get("device_peak_mib")
    return memory.get("peak_rss_mib")


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


def parity_row(runner: Runner, width: float, weights: Path) -> dict:
    import numpy as np

    options = {"width": width, "weights": weights}
    torch_result = runner.one_shot("torch", "torch", "parity", {**options, "save_weights": True})
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
    }


def train_rows(runner: Runner, weights_for) -> list[dict]:
    plan, rows, first = runner.plan, [], True
    for width in plan.widths:
        for batch in plan.batches:
            for precision in plan.precisions:
                setting = {"width": width, "batch": batch, "precision": precision, "steps": plan.steps_for(width, batch)}
                name = f"train w{width:g} b{batch} {precision}"
                if runner.over_budget("train"):
                    rows.append({"task": "train", "name": name, "setting": setting, "skipped": "time budget used up"})
                    continue
                options = {**setting, "weights": weights_for(width)}
                specs = [("jax", "jax", options), ("torch-device", "torch", {**options, "pipeline": "device"})]
                if plan.loader_rows == "all" or first:
                    specs.append(("torch-loader", "torch", {**options, "pipeline": "loader", "loader_workers": plan.loader_workers}))
                row = measured_row(runner, "train", name, setting, specs)
                if first and "workers" in row:
                    row["workers"]["jax"]["second_run"] = second_run_first_call(runner, "train", options)
                first = False
                rows.append(row)
    if plan.torch_compile_rows == "last" and plan.widths and plan.batches and plan.precisions:
        width, batch, precision = plan.widths[0], plan.batches[0], plan.precisions[0]
        setting = {"width": width, "batch": batch, "precision": precision, "steps": plan.steps_for(width, batch)}
        name = f"train w{width:g} b{batch} {precision} torch.compile"
        if runner.over_budget("train-compile"):
            rows.append({"task": "train", "name": name, "setting": setting, "skipped": "time budget used up"})
        else:
            options = {**setting, "weights": weights_for(width)}
            specs = [("jax", "jax", options), ("torch-compile", "torch", {**options, "pipeline": "device", "torch_compile": True})]
            rows.append(measured_row(runner, "train", name, setting, specs))
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


def measured_row(runner: Runner, task: str, name: str, setting: dict, specs: list) -> dict:
    runner.log(f"[{runner.elapsed():6.0f} s] {name}: {', '.join(label for label, _, _ in specs)}")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
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
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


def eval_rows(runner: Runner, weights_for) -> list[dict]:
    plan, rows = runner.plan, []
    for width in plan.eval_widths:
        for precision in plan.eval_precisions:
            setting = {"width": width, "precision": precision, "eval_images": plan.eval_images, "eval_batch": plan.eval_batch}
            name = f"eval w{width:g} {precision}"
            if runner.over_budget("eval"):
                rows.append({"task": "eval", "name": name, "setting": setting, "skipped": "time budget used up"})
                continue
            options = {**setting, "weights": weights_for(width)}
            rows.append(measured_row(runner, "eval", name, setting, [("jax", "jax", options), ("torch", "torch", options)]))
    return rows


def gradcam_rows(runner: Runner, weights_for) -> list[dict]:
    plan, rows = runner.plan, []
    for width in plan.gradcam_widths:
        setting = {"width": width, "gradcam_images": plan.gradcam_images, "gradcam_batch": plan.gradcam_batch, "layer": "layer3"}
        name = f"gradcam w{width:g}"
        if runner.over_budget("gradcam"):
            rows.append({"task": "gradcam", "name": name, "setting": setting, "skipped": "time budget used up"})
            continue
        options = {**setting, "weights": weights_for(width)}
        options.pop("layer")
        rows.append(measured_row(runner, "gradcam", name, setting, [("jax", "jax", options), ("torch", "torch", options)]))
    return rows


def accuracy_row(runner: Runner, weights_for, data_reason: str | None) -> dict:
    plan = runner.plan
    setting = {
        "width": plan.accuracy_width,
        "epochs": plan.accuracy_epochs,
        "train_subset": plan.accuracy_subset,
        "batch": plan.accuracy_batch,
        "precision": plan.accuracy_precision,
        "target": plan.accuracy_target,
        "repeats": plan.accuracy_repeats,
    }
    name = f"time to accuracy w{plan.accuracy_width:g} {plan.accuracy_epochs} epochs"
    if data_reason:
        return {"task": "accuracy", "name": name, "setting": setting, "skipped": data_reason}
    options = {
        "width": plan.accuracy_width,
        "epochs": plan.accuracy_epochs,
        "train_subset": plan.accuracy_subset,
        "accuracy_batch": plan.accuracy_batch,
        "precision": plan.accuracy_precision,
        "target": plan.accuracy_target,
        "weights": weights_for(plan.accuracy_width),
    }
    runs = {"jax": [], "torch": []}
    runner.log(f"[{runner.elapsed():6.0f} s] {name} (each framework in turn, {plan.accuracy_repeats} run(s) each)")
    try:
        for _ in range(plan.accuracy_repeats):
            for framework in ("jax", "torch"):
                result = runner.one_shot(framework, framework, "accuracy", options, timeout=max(runner.timeout, 36000))
                result.pop("event", None)
                runs[framework].append(result)
                runner.log(
                    f"    {framework}: accuracy {result['final_accuracy']:.4f}, wall {result['wall_seconds']:.1f} s"
                )
    except WorkerError as error:
        runner.log(f"    failed: {error}")
        return {"task": "accuracy", "name": name, "setting": setting, "error": str(error), "runs": runs}
    walls = {f: [r["wall_seconds"] for r in runs[f]] for f in runs}
    ratios = {"wall_seconds jax/torch": common.ratio_summary(walls["jax"], walls["torch"])}
    targets = [(a["seconds_to_target"], b["seconds_to_target"]) for a, b in zip(runs["jax"], runs["torch"])]
    if plan.accuracy_target is not None and all(a is not None and b is not None for a, b in targets):
        ratios["seconds_to_target jax/torch"] = common.ratio_summary([a for a, _ in targets], [b for _, b in targets])
    return {
        "task": "accuracy",
        "name": name,
        "setting": setting,
        "runs": runs,
        "workers": {
            f: {
                "final_accuracy": common.summarize([r["final_accuracy"] for r in runs[f]]),
                "wall_seconds": common.summarize(walls[f]),
                "seconds_to_target": [r["seconds_to_target"] for r in runs[f]],
                "train_images": runs[f][0]["train_images"],
                "test_images": runs[f][0]["test_images"],
                "memory_mib": runs[f][0].get("device_peak_mib") if plan.device == "gpu" else runs[f][0].get("peak_rss_mib"),
                "compile_seconds": runs[f][0].get("compile_seconds"),
            }
            for f in runs
        },
        "ratios": ratios,
    }


# --------------------------------------------------------------------------- main


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
    p.add_argument("--accuracy-width", type=float)
    p.add_argument("--accuracy-epochs", type=int)
    p.add_argument("--accuracy-subset", type=int, help="train images for time to accuracy (default: the mode's)")
    p.add_argument("--accuracy-precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--accuracy-target", type=float)
    p.add_argument("--budget-seconds", type=float, help="skip remaining rows after this long (gpu suite: 500)")
    p.add_argument("--data", help="CIFAR-10 source (default: <repo>/../shared/data/cifar10-jpeg.tar.gz), or 'synthetic'")
    p.add_argument("--cache-dir", help="decoded-array cache (default: $JAXRES_CACHE or ~/.cache/jaxres)")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="results folder")
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


def run(plan: Plan, args, results: dict, log=print) -> dict:
    """Measure everything in `plan`, appending to `results` as it goes (so an interruption
    keeps what was measured)."""
    started = time.perf_counter()
    scratch = Path(args.out) / "tmp"
    data, data_record, data_reason = resolve_data(args.data, args.cache_dir, log)
    results["data"] = data_record
    runner = Runner(plan, data, args.cache_dir, scratch, args.timeout, log)
    runner.started = started
    if plan.jax_xla_flags:
        results["notes"].append(f"experiment: the jaxres workers ran with extra XLA_FLAGS `{plan.jax_xla_flags}` (not the default)")
    if plan.device == "cpu":
        results["notes"].append(
            "CPU: jaxres runs an epoch as a host loop over the jitted step (epoch_loop auto -> steps), "
            "since XLA:CPU convolutions inside lax.scan are much slower (jax-ml/jax#12868)."
        )
    weights = {}

    def weights_for(width: float) -> Path:
        if width not in weights:
            path = scratch / "weights" / f"custom_resnet_w{width:g}.npz"
            row = parity_row(runner, width, path)
            results["parity"].append(row)
            status = "ok" if row["passed"] else "MISMATCH"
            log(
                f"[{runner.elapsed():6.0f} s] parity w{width:g}: max |logit diff| {row['max_abs_difference']:.2e} "
                f"(relative {row['relative_difference']:.2e}), argmax agreement {row['argmax_agreement']:.3f}, "
                f"Grad-CAM max diff {row['cam_max_abs_difference']}: {status}"
            )
            if not row["passed"]:
                raise SystemExit(f"error: jaxres and PyTorch disagree on the same weights at width {width:g}; not timing")
            weights[width] = path
        return weights[width]

    for task in plan.tasks:
        if task == "parity":
            needed = plan.widths + plan.eval_widths + plan.gradcam_widths
            if "accuracy" in plan.tasks:
                needed.append(plan.accuracy_width)
            widths = sorted(set(needed), reverse=True)
            for width in widths:
                weights_for(width)
        elif task == "train":
            results["rows"] += train_rows(runner, weights_for)
        elif task == "eval":
            results["rows"] += eval_rows(runner, weights_for)
        elif task == "gradcam":
            results["rows"] += gradcam_rows(runner, weights_for)
        elif task == "accuracy":
            if runner.over_budget():
                results["rows"].append({"task": "accuracy", "name": "time to accuracy", "skipped": "time budget used up"})
            else:
                results["rows"].append(accuracy_row(runner, weights_for, data_reason))
    results["duration_seconds"] = runner.elapsed()
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def write_outputs(results: dict, out_dir: Path, chart: bool = True) -> list[Path]:
    from benchmarks import report

    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    paths = [out_dir / f"{results['name']}.json", out_dir / "latest.json"]
    for path in paths:
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
    readme = out_dir / "README_results.md"
    readme.write_text(report.readme_section(results, chart_path="benchmarks/results/ratios.png"))
    paths.append(readme)
    if chart:
        chart_path = out_dir / "ratios.png"
        if report.plot_ratios(results, chart_path):
            paths.append(chart_path)
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(plan), indent=1))
        return 0
    print(f"benchmarks: suite {plan.suite}, mode {plan.mode}, device {plan.device}, {plan.threads} thread(s) per worker, "
          f"{plan.repeats} alternating repeats after {plan.warmup} warm-up call(s)", flush=True)
    results = new_results(plan, args)
    load = results["machine"].get("load_average_at_start")
    if load and load[0] > 0.5:
        print(f"warning: the 1-minute load average is {load[0]:.2f} before starting: other work on this machine "
              "will be measured too (each row records the CPU other processes used)", flush=True)
    started = time.perf_counter()
    try:
        run(plan, args, results, log=lambda text: print(text, flush=True))
    except KeyboardInterrupt:
        results["interrupted"] = f"interrupted after {time.perf_counter() - started:.0f} s; later rows were not measured"
        results["notes"].append(results["interrupted"])
        print(results["interrupted"], file=sys.stderr)
    results.setdefault("duration_seconds", time.perf_counter() - started)
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
