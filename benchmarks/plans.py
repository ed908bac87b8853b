"""What one run of the benchmark suite measures: the `Plan` dataclass and `make_plan`,
which picks the named plan (CPU quick, CPU full, GPU, smoke) for the command line's flags
and applies the explicit overrides.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common

TASK_NAMES = ("parity", "train", "eval", "gradcam", "accuracy")


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
