"""What one run of the benchmark suite measures: the `Plan` dataclass, the named plans
(CPU full, CPU quick, GPU, and the smoke-sized version of any of them) and `make_plan`,
which picks one for the command line's flags and applies the explicit overrides.

The CPU full plan is the base; every other plan is `dataclasses.replace` of it, so each
states only what it changes.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common

TASK_NAMES = ("parity", "train", "eval", "gradcam", "accuracy", "converged")

OVERRIDABLE_FIELDS = (
    "repeats", "warmup", "loader_workers", "accuracy_epochs", "accuracy_subset", "accuracy_width",
    "accuracy_precision", "accuracy_target", "accuracy_repeats", "budget_seconds", "eval_images", "gradcam_images",
    "converged_width", "converged_epochs", "converged_subset", "converged_batch", "converged_seeds",
)  # flags that replace the plan's field of the same name when given


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
    # the recipe at convergence: whole runs of both frameworks from the same weights, one per
    # seed, final test accuracy without and with `converged_tta` (the "converged" task)
    converged_width: float
    converged_epochs: int
    converged_subset: int | None
    converged_batch: int
    converged_seeds: int
    converged_tta: str
    tasks: list[str]
    budget_seconds: float | None
    parity_tolerance: float = 1e-4  # max |logit diff| / max |logit|
    jax_xla_flags: str = ""  # extra XLA_FLAGS for the jax workers (an experiment, recorded in the results)
    jax_conv_backend: str = "auto"  # TrainConfig.conv_backend of the jax workers (another one: an experiment)

    def steps_for(self, width: float, batch: int) -> int:
        images = self.train_images_per_measure.get(width, self.train_images_per_measure.get("default", 1024))
        return max(1, int(images) // batch)


# --------------------------------------------------------------------------- the named plans


def measured_widths(widths: list[float]) -> dict:
    """The plan fields that set the same widths for train, eval and Grad-CAM (time to
    accuracy keeps its own `accuracy_width`)."""
    return {"widths": list(widths), "eval_widths": list(widths), "gradcam_widths": list(widths)}


def cpu_full_plan(device: str, threads: int) -> Plan:
    """The CPU suite: widths 0.25 and 1.0, batches 128 and 512, fp32 and bf16, the DataLoader
    pipeline on every train row, time to accuracy at width 0.25 on all images for 4 epochs, and
    last the recipe at convergence: width 0.25, 24 epochs on all images, batch 512, two seeds
    per framework, final accuracy without and with the flip TTA (hours on 2 cores: resumable,
    `benchmarks.run --resume`)."""
    return Plan(
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
        converged_width=0.25,
        converged_epochs=24,
        converged_subset=None,
        converged_batch=512,
        converged_seeds=2,
        converged_tta="flip",
        tasks=list(TASK_NAMES),
        budget_seconds=None,
    )


def cpu_quick_plan(device: str, threads: int) -> Plan:
    """`--quick`: the CPU suite at width 0.25 and batch 128 only, the DataLoader pipeline on
    the first row, time to accuracy on 10,240 images for 4 epochs (under 10 minutes on 2 cores)."""
    return dataclasses.replace(
        cpu_full_plan(device, threads),
        mode="quick",
        **measured_widths([0.25]),
        batches=[128],
        train_images_per_measure={0.25: 768, "default": 256},
        loader_rows="first",
        # 80 steps a run, three seeds: after 20 steps (5,120 images, 2 epochs, the row until
        # 2026-12-01) the accuracy was mostly the seed's (a paired jaxres-PyTorch difference of
        # SD 2.8 points over 10 seeds); after 80 it is 0.9 points (benchmarks/README.md)
        accuracy_epochs=4,
        accuracy_subset=10240,
        accuracy_repeats=3,
        tasks=[task for task in TASK_NAMES if task != "converged"],  # hours: the full suite's alone
    )


def gpu_plan(device: str, threads: int) -> Plan:
    """The GPU suite (`benchmarks/gpu.sh`): first the full 24-epoch recipe to 94 %, then fp16,
    bf16 and fp32 training at width 1 and batch 512, evaluation in each precision and
    Grad-CAM, within a 500 s budget (`estimated_gpu_seconds`: about 435 s). The torch.compile
    row and width 0.25 are left to `--torch-compile` and `--widths 1 0.25`: with them the
    plan's estimate was about 1,015 s, so the budget would have cut half its rows."""
    return dataclasses.replace(
        cpu_full_plan(device, threads),
        suite="gpu",
        mode="gpu",
        widths=[1.0],
        batches=[512],
        precisions=["fp16", "bf16", "fp32"],
        train_images_per_measure={"default": 16384},
        loader_workers=min(8, max(1, threads - 1)),
        loader_rows="first",
        torch_compile_rows="none",
        eval_widths=[1.0],
        eval_precisions=["fp32", "bf16", "fp16"],
        eval_images=10000,
        eval_batch=1000,
        gradcam_widths=[1.0],
        gradcam_images=2048,
        gradcam_batch=256,
        accuracy_width=1.0,
        accuracy_epochs=24,
        accuracy_precision="fp16",
        accuracy_target=0.94,
        tasks=["parity", "accuracy", "train", "eval", "gradcam"],
        budget_seconds=500.0,
    )


# Seconds a row of each kind takes on a GPU, estimated from its parts (nothing of jaxres has
# run on a GPU yet; the first lent run replaces these with its rows' own times): a row starts
# workers (about 8 s each) and compiles the jaxres program (20-40 s); its measurements take
# about a second. The first train row also runs the DataLoader worker and jaxres's second run.
GPU_ROW_SECONDS = {
    "parity": 20.0, "accuracy": 100.0, "train_first": 90.0, "train": 50.0, "torch_compile": 110.0,
    "eval": 30.0, "gradcam": 35.0,
}  # fmt: skip


def estimated_gpu_seconds(plan: Plan) -> dict:
    """{task: estimated seconds} of `plan`'s rows on a GPU (`GPU_ROW_SECONDS`), and "total"."""
    train_rows = len(plan.widths) * len(plan.batches) * len(plan.precisions)
    estimate = {
        "parity": GPU_ROW_SECONDS["parity"] * len(set(plan.widths + plan.eval_widths + plan.gradcam_widths + [plan.accuracy_width])),
        "accuracy": GPU_ROW_SECONDS["accuracy"] if "accuracy" in plan.tasks else 0.0,
        "train": (GPU_ROW_SECONDS["train_first"] + GPU_ROW_SECONDS["train"] * (train_rows - 1) if train_rows else 0.0)
        + (GPU_ROW_SECONDS["torch_compile"] if plan.torch_compile_rows == "last" else 0.0),
        "eval": GPU_ROW_SECONDS["eval"] * len(plan.eval_widths) * len(plan.eval_precisions),
        "gradcam": GPU_ROW_SECONDS["gradcam"] * len(plan.gradcam_widths),
    }
    estimate = {task: seconds for task, seconds in estimate.items() if task in plan.tasks}
    return {**estimate, "total": sum(estimate.values())}


def smoke_plan(plan: Plan) -> Plan:
    """`--smoke`: `plan`'s shape at toy sizes, to check the machinery (e.g. the GPU suite on a CPU)."""
    return dataclasses.replace(
        plan,
        mode="smoke",
        repeats=2,
        warmup=1,
        **measured_widths([0.0625]),
        batches=[32],
        train_images_per_measure={"default": 64},
        eval_images=256,
        eval_batch=128,
        gradcam_images=64,
        gradcam_batch=32,
        **{f"{row}_{name}": value for row in ("accuracy", "converged")  # both training rows: one tiny run
           for name, value in dict(width=0.0625, epochs=1, subset=1024, batch=128).items()},
        converged_seeds=2,
        loader_workers=min(plan.loader_workers, 1),
    )


def on_cpu_device(plan: Plan, torch_compile: bool) -> Plan:
    """`plan` as a CPU can run it: fp32 and bf16 (PyTorch CPU autocast), fp16 only on a GPU;
    no torch.compile row unless asked for."""
    return dataclasses.replace(
        plan,
        precisions=[p for p in plan.precisions if p != "fp16"],
        eval_precisions=[p for p in plan.eval_precisions if p == "fp32"],
        accuracy_precision="fp32",
        torch_compile_rows=plan.torch_compile_rows if torch_compile else "none",
    )


# --------------------------------------------------------------------------- from the command line


def named_plan(args) -> Plan:
    """The suite's plan (`--suite`, `--quick`, `--smoke`, `--device`, `--threads`), before overrides."""
    suite = args.suite or ("gpu" if common.gpu_info() else "cpu")
    device = args.device or suite
    threads = args.threads or common.available_cores()
    if suite == "gpu":
        plan = gpu_plan(device, threads)
    elif args.quick:
        plan = cpu_quick_plan(device, threads)
    else:
        plan = cpu_full_plan(device, threads)
    if args.smoke:
        plan = smoke_plan(plan)
    if plan.device == "cpu":
        plan = on_cpu_device(plan, args.torch_compile)
    return plan


def with_overrides(plan: Plan, args) -> Plan:
    """`plan` with the explicit flags (`--repeats`, `--widths`, `--tasks`, ...) applied."""
    changes = {name: getattr(args, name) for name in OVERRIDABLE_FIELDS if getattr(args, name, None) is not None}
    if args.widths:
        changes.update(measured_widths(args.widths))
    if args.batches:
        changes["batches"] = args.batches
    if args.precisions:
        changes["precisions"] = args.precisions
    if args.train_images:
        changes["train_images_per_measure"] = {"default": args.train_images}
    if args.tasks:
        order = TASK_NAMES if plan.suite == "cpu" else plan.tasks  # the suite's order, whatever the flag's
        changes["tasks"] = [t for t in order if t in args.tasks]
    if args.torch_compile and plan.torch_compile_rows == "none":
        changes["torch_compile_rows"] = "last"
    if args.jax_xla_flags:
        changes["jax_xla_flags"] = args.jax_xla_flags
    if args.jax_conv_backend:
        changes["jax_conv_backend"] = args.jax_conv_backend
    return dataclasses.replace(plan, **changes)


def make_plan(args) -> Plan:
    """The plan for `benchmarks.run`'s parsed arguments; exits with an error on an impossible one."""
    plan = with_overrides(named_plan(args), args)
    if plan.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    if plan.accuracy_repeats < 1:
        raise SystemExit("error: --accuracy-repeats must be at least 1")
    if plan.converged_seeds < 1:
        raise SystemExit("error: --converged-seeds must be at least 1")
    return plan


PLAN_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Plan) if field.default is not dataclasses.MISSING}


def plan_from_record(record: dict) -> Plan:
    """The `Plan` a results file recorded (`dataclasses.asdict` through JSON, whose object keys
    are strings: `train_images_per_measure`'s widths come back as floats). Exits with an error
    naming the missing fields when the file is older than this `Plan`."""
    names = {field.name for field in dataclasses.fields(Plan)}
    missing = sorted(name for name in names if name not in record and name not in PLAN_DEFAULTS)
    if missing:
        raise SystemExit(f"error: the recorded plan lacks {', '.join(missing)} (written by an older benchmarks.run): cannot resume it")
    values = {**PLAN_DEFAULTS, **{name: value for name, value in record.items() if name in names}}
    values["train_images_per_measure"] = {
        key if key == "default" else float(key): value for key, value in values["train_images_per_measure"].items()
    }
    return Plan(**values)

