"""Where a jaxres train step spends its time: `python -m benchmarks.profile_jax`.

Runs `--steps` steps of `jaxres.train.make_train_epoch` (the benchmarked code path) under
`jax.profiler.trace(..., create_perfetto_trace=True)`, then adds up the durations of the
XLA operations in the trace by name and by kind (convolution, fusion, copy, ...), and maps
each fusion to the HLO ops inside it (from the compiled step's HLO text). Prints a
markdown table and writes JSON (default benchmarks/results/tmp/profile/). Optional: `--torch` adds
the PyTorch step's top operators (torch.profiler) for comparison.

    python -m benchmarks.profile_jax --width 0.25 --batch 128 --steps 6
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

KIND_PATTERNS = (
    ("convolution", re.compile(r"^(convolution|conv)")),
    ("fusion", re.compile(r"fusion")),
    ("copy/transpose", re.compile(r"^(copy|transpose)")),
    ("reduce", re.compile(r"^reduce")),
    ("select-and-scatter", re.compile(r"^select-and-scatter")),
    ("dot", re.compile(r"^dot")),
    ("gather/scatter", re.compile(r"^(gather|scatter|dynamic-slice|dynamic-update-slice)")),
)


def kind_of(name: str) -> str:
    for kind, pattern in KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def load_trace_events(trace_dir: Path) -> list[dict]:
    paths = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as file:
        trace = json.load(file)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


CONV_LINE = re.compile(r"convolution\(.*window=\{size=(?P<window>[\dx]+)[^}]*\}.*?op_name=\"(?P<op_name>[^\"]+)\"")


def convolution_role(window: str, op_name: str) -> str:
    """forward, backward-input or backward-filter, from the convolution's window and JAX op name.

    In the backward pass (`transpose(jvp(...))` in the op name) the filter gradient is a
    convolution whose window is the activation itself (e.g. 32x32); the input gradient keeps
    the 3x3 kernel window.
    """
    if "transpose(" not in op_name:
        return "forward"
    height, *_ = (int(v) for v in window.split("x"))
    return "backward-filter" if height > 3 else "backward-input"


def fusion_contents(hlo_text: str) -> tuple[dict[str, collections.Counter], dict[str, dict]]:
    """({instruction: Counter of the HLO opcodes it runs}, {instruction: convolution details}).

    Fusions map to the opcodes of their fused computation; a convolution (fused or not)
    maps to {window, role, layer}.
    """
    computations, convolutions, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = collections.Counter()
            continue
        if current is not None:
            op = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^\s]+(?:\{[^}]*\})?\s+([\w\-]+)\(", line)
            if op:
                computations[current][op.group(2)] += 1
                conv = CONV_LINE.search(line) if op.group(2) == "convolution" else None
                if conv:
                    layer = re.search(r"CustomResNet\)*/([\w/]+)/conv/", conv.group("op_name"))
                    details = {
                        "window": conv.group("window"),
                        "role": convolution_role(conv.group("window"), conv.group("op_name")),
                        "layer": layer.group(1) if layer else conv.group("op_name"),
                    }
                    convolutions[op.group(1)] = details
                    convolutions.setdefault("@" + current, details)
            if line.strip() == "}":
                current = None
    fusions, conv_of = {}, dict(convolutions)
    for line in hlo_text.splitlines():
        match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\sfusion\(.*calls=%?([\w.\-]+)", line)
        if match:
            fusions[match.group(1)] = computations.get(match.group(2), collections.Counter())
            if "@" + match.group(2) in convolutions:
                conv_of[match.group(1)] = convolutions["@" + match.group(2)]
    return fusions, {k: v for k, v in conv_of.items() if not k.startswith("@")}


def aggregate(events: list[dict], names: set[str] | None = None) -> tuple[dict, float]:
    """(name -> {seconds, count}, total seconds) over complete events ('ph' == 'X') named in `names`
    (all when None), excluding Python/host frames."""
    totals: dict[str, dict] = collections.defaultdict(lambda: {"seconds": 0.0, "count": 0})
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        name = event.get("name", "")
        if names is not None and name not in names:
            continue
        totals[name]["seconds"] += event["dur"] / 1e6
        totals[name]["count"] += 1
    return dict(totals), sum(v["seconds"] for v in totals.values())


def profile_jax(args) -> dict:
    import jax

    from jaxres import backends, optim, parallel, train
    from jaxres.config import TrainConfig

    from jaxres import config as config_lib

    sizes = {"width": args.width, "batch_size": args.batch, "precision": args.precision}
    config = config_lib.preset(args.preset, **sizes) if args.preset else TrainConfig(**sizes)
    model = backends.model_from_config(config, num_classes=10)
    optimizer, _ = optim.make_optimizer(config, args.steps)
    mesh = parallel.make_mesh()
    state = parallel.replicate_tree(mesh, train.init_train_state(config, optimizer, common.random_variables(model, 0)))
    rng = np.random.default_rng(0)
    images = parallel.replicate(mesh, rng.integers(0, 256, (max(4096, args.steps * args.batch), 32, 32, 3), dtype=np.uint8))
    labels = parallel.replicate(mesh, rng.integers(0, 10, (images.shape[0],), dtype=np.int32))
    epoch = train.make_train_epoch(model, optimizer, config, mesh, args.steps)
    for call in range(2):  # compile and settle
        state, metrics = epoch(state, images, labels, jax.random.PRNGKey(call))
        jax.block_until_ready(metrics)

    # HLO of the step: lower the same function make_train_epoch jits (one_step) through a fresh jit
    step_hlo = ""
    try:
        import functools

        step = functools.partial(
            train.train_step, model=model, optimizer=optimizer, config=config, steps_per_epoch=args.steps,
            indices=jax.numpy.arange(args.batch),
        )  # fmt: skip
        lowered = jax.jit(step).lower(state, images[: args.batch], labels[: args.batch], jax.random.PRNGKey(0))
        step_hlo = lowered.compile().as_text()
    except Exception as error:  # noqa: BLE001
        print(f"(no HLO text: {error})", file=sys.stderr)
    op_names = set()
    for line in step_hlo.splitlines():
        match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if match:
            op_names.add(match.group(1))

    trace_dir = Path(args.out) / "jax-trace"
    started = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        state, metrics = epoch(state, images, labels, jax.random.PRNGKey(7))
        jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - started
    events = load_trace_events(trace_dir)
    # XLA:CPU thunks show up under their HLO instruction names
    totals, total = aggregate(events, op_names or None)
    fusions, convolutions = fusion_contents(step_hlo) if step_hlo else ({}, {})
    by_kind = collections.defaultdict(float)
    for name, value in totals.items():
        kind = kind_of(name)
        if name in convolutions:
            kind = f"convolution, {convolutions[name]['role']}"
        by_kind[kind] += value["seconds"]
    top = sorted(totals.items(), key=lambda item: -item[1]["seconds"])[: args.top]
    return {
        "framework": "jax",
        "width": args.width,
        "batch": args.batch,
        "precision": args.precision,
        "steps": args.steps,
        "wall_seconds": wall,
        "images_per_second": args.steps * args.batch / wall,
        "op_seconds_total": total,
        "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top": [
            {
                "name": name,
                "seconds": value["seconds"],
                "count": value["count"],
                "share": value["seconds"] / total if total else None,
                "contains": dict(fusions.get(name, {})),
                "convolution": convolutions.get(name),
            }
            for name, value in top
        ],
        "trace_dir": str(trace_dir),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "note": "op times are the XLA:CPU thunks' own trace events; thunks that run asynchronously "
        "on the intra-op pool may be missing (compare op_seconds_total with wall_seconds)",
    }


def profile_torch(args) -> dict:
    import torch

    from benchmarks import torch_train

    torch.set_num_threads(args.threads)
    recipe = torch_train.Recipe(width=args.width, batch_size=args.batch, channels_last=True)
    model = torch_train.build_model(recipe, torch.device("cpu"))
    trainer = torch_train.Trainer(model, recipe, args.steps, torch.device("cpu"))
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, (4096,)).astype(np.int64))
    batches = torch_train.device_batches(images, labels, recipe, torch.Generator().manual_seed(0))
    torch_train.train_steps(trainer, batches, 2)
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch_train.train_steps(trainer, batches, args.steps)
    wall = time.perf_counter() - started
    rows = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
    total = sum(e.self_cpu_time_total for e in profiler.key_averages()) / 1e6
    return {
        "framework": "torch",
        "wall_seconds": wall,
        "images_per_second": args.steps * args.batch / wall,
        "op_seconds_total": total,
        "top": [{"name": e.key, "seconds": e.self_cpu_time_total / 1e6, "count": e.count, "share": e.self_cpu_time_total / 1e6 / total} for e in rows],
    }


def markdown(profile: dict) -> str:
    lines = [
        f"{profile['framework']}: {profile['images_per_second']:.0f} img/s under the profiler "
        f"({profile['wall_seconds']:.2f} s wall, {profile['op_seconds_total']:.2f} s in ops)",
        "",
        "| op | seconds | calls | share | contains |",
        "|---|---|---|---|---|",
    ]
    for row in profile["top"]:
        conv = row.get("convolution")
        if conv:
            contains = f"convolution {conv['role']}, {conv['layer']}, window {conv['window']}"
        else:
            contains = ", ".join(f"{op} x{n}" for op, n in sorted(row.get("contains", {}).items(), key=lambda i: -i[1])[:6])
        share = f"{100 * row['share']:.1f}%" if row.get("share") is not None else "–"
        lines.append(f"| {row['name']} | {row['seconds']:.3f} | {row['count']} | {share} | {contains} |")
    if profile.get("by_kind"):
        lines += ["", "| kind | seconds | share |", "|---|---|---|"]
        for kind, seconds in profile["by_kind"].items():
            lines.append(f"| {kind} | {seconds:.3f} | {100 * seconds / profile['op_seconds_total']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="profile a named preset's step (e.g. airbench94), at --width and --batch")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="the step's precision")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--threads", type=int, default=common.available_cores())
    parser.add_argument("--torch", action="store_true", help="also profile the PyTorch step (torch.profiler)")
    parser.add_argument("--out", default=str(common.SCRATCH_DIR / "profile"))
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {"jax": profile_jax(args)}
    print(markdown(results["jax"]))
    if args.torch:
        results["torch"] = profile_torch(args)
        print()
        print(markdown(results["torch"]))
    path = Path(args.out) / f"profile-w{args.width:g}-b{args.batch}-{args.precision}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
