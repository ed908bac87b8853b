"""oneDNN's convolutions (`jaxres.onednn`, the conv_backend "onednn") and Winograd's
(`jaxres.winograd`, the conv_algorithm "winograd") against XLA's own, in one process:
`python -m benchmarks.onednn_conv`.

1. times forward, input gradient and weight gradient of every convolution shape of the
   custom ResNet or airbench94 (`--model`, `--width`, `--batch`), XLA against oneDNN and
   Winograd's F(4x4, 3x3) (medians; oneDNN's own kernels, also for the wide layers jaxres
   leaves to XLA), with their relative differences from XLA's and oneDNN's kernel names;
2. times the jitted train epoch (`jaxres.train.make_train_epoch`) in the `STEP_VARIANTS`
   (XLA's or oneDNN's convolutions, host loop or scan), alternating calls, and reports the
   median of the pairwise speedups over XLA's host loop.

Results: stdout (markdown) and benchmarks/results/onednn-<width>-<batch>-<UTC time>.json.
The measured decisions are in benchmarks/README.md ("What each change gained").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

from benchmarks import common
from jaxres import onednn, winograd


# The train-epoch variants compared, (conv_backend, epoch_loop): XLA's convolutions (a host
# loop: XLA's convolutions in a scan are many times slower), oneDNN's in a host loop, and
# oneDNN's with the loop "auto" picks (scan when no XLA convolution is left).
STEP_VARIANTS = (("xla", "steps"), ("onednn", "steps"), ("onednn", "auto"))


def model_shapes(width: float, batch: int, model: str = "custom_resnet") -> list[tuple[tuple[int, int, int, int, int], int]]:
    """(batch, size, size, in, out) of each distinct 3x3 convolution of `model` ("custom_resnet"
    or "airbench94", at 32x32 inputs), with how many times it occurs."""
    from jaxres.models import scaled_channels

    c = lambda n: scaled_channels(n, width)  # noqa: E731
    if model == "airbench94":  # 31x31 after the whitening layer; each block pools between its two convolutions
        return [
            ((batch, 31, 31, 24, c(64)), 1), ((batch, 15, 15, c(64), c(64)), 1), ((batch, 15, 15, c(64), c(256)), 1),
            ((batch, 7, 7, c(256), c(256)), 2), ((batch, 3, 3, c(256), c(256)), 1),
        ]
    return [
        ((batch, 32, 32, 3, c(64)), 1), ((batch, 32, 32, c(64), c(128)), 1), ((batch, 16, 16, c(128), c(128)), 2),
        ((batch, 16, 16, c(128), c(256)), 1), ((batch, 8, 8, c(256), c(512)), 1), ((batch, 4, 4, c(512), c(512)), 2),
    ]


def _median_ms(function, repeats: int) -> float:
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def xla_conv3x3(x, w):
    """XLA's own 3x3 / stride 1 / padding 1 convolution, NHWC x HWIO: what oneDNN is timed against."""
    import jax

    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def measure_layers(width: float, batch: int, repeats: int, model: str = "custom_resnet") -> list[dict]:
    import jax
    import jax.numpy as jnp

    library = onednn.default()
    rows = []
    for (n, h, w, ci, co), count in model_shapes(width, batch, model):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, h, w, ci), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, ci, co), dtype=np.float32) / np.sqrt(9 * ci))
        g = jnp.asarray(rng.standard_normal((n, h, w, co), dtype=np.float32))
        row = {"shape": [n, h, w, ci, co], "count": count, "ms": {}, "relative_difference": {}}
        outputs = {}
        xla = xla_conv3x3
        implementations = {
            "xla": {
                "forward": jax.jit(xla),
                "input_grad": jax.jit(lambda x, k, g: jax.vjp(lambda x: xla(x, k), x)[1](g)[0]),
                "weight_grad": jax.jit(lambda x, k, g: jax.vjp(lambda k: xla(x, k), k)[1](g)[0]),
            },
            "onednn": {  # oneDNN's own three kernels
                "forward": jax.jit(library.forward),
                "input_grad": jax.jit(lambda x, k, g: library.input_gradient(g, k)),
                "weight_grad": jax.jit(lambda x, k, g: library.weight_gradient(x, g)),
            },
            "winograd": {  # F(4x4, 3x3); its input gradient is the same algorithm again
                "forward": jax.jit(winograd.conv3x3),
                "input_grad": jax.jit(lambda x, k, g: jax.vjp(lambda x: winograd.conv3x3(x, k), x)[1](g)[0]),
                "weight_grad": jax.jit(lambda x, k, g: jax.vjp(lambda k: winograd.conv3x3(x, k), k)[1](g)[0]),
            },
        }
        for name, ops in implementations.items():
            args = {"forward": (x, k), "input_grad": (x, k, g), "weight_grad": (x, k, g)}
            outputs[name] = {op: f(*args[op]) for op, f in ops.items()}
            row["ms"][name] = {
                op: _median_ms(lambda f=f, a=args[op]: jax.block_until_ready(f(*a)), repeats) for op, f in ops.items()
            }
        for name in ("onednn", "winograd"):  # max |difference from XLA's| / max |XLA's|
            row["relative_difference"][name] = {}
            for op in outputs["xla"]:
                a, b = np.asarray(outputs["xla"][op], np.float64), np.asarray(outputs[name][op], np.float64)
                row["relative_difference"][name][op] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        row["onednn_kernels"] = library.implementations(n, h, w, ci, co)
        rows.append(row)
    return rows


def measure_step(width: float, batch: int, steps: int, calls: int) -> dict:
    """The jitted train epoch (make_train_epoch of `steps` steps) in each of `STEP_VARIANTS`,
    alternating calls; img/s medians and the pairwise speedups over XLA's host loop."""
    import jax

    from jaxres import backends, optim, parallel, train
    from jaxres.config import TrainConfig

    config = TrainConfig(width=width, batch_size=batch)
    optimizer, _ = optim.make_optimizer(config, steps)
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = parallel.replicate(mesh, rng.integers(0, 256, (max(4096, batch * steps), 32, 32, 3), dtype=np.uint8))
    labels = parallel.replicate(mesh, rng.integers(0, 10, (images.shape[0],), dtype=np.int32))
    runs = {}
    for backend, loop in STEP_VARIANTS:
        run_config = dataclasses.replace(config, conv_backend=backend, epoch_loop=loop)
        model = backends.model_from_config(run_config, num_classes=10)
        state = train.init_train_state(run_config, optimizer, common.random_variables(model, 0))
        epoch = train.make_train_epoch(model, optimizer, run_config, mesh, steps)
        start = time.perf_counter()
        state, metrics = epoch(parallel.replicate_tree(mesh, state), images, labels, jax.random.PRNGKey(0))
        jax.block_until_ready(metrics)
        name = f"{backend}/{epoch.loop}"
        runs[name] = {"epoch": epoch, "state": state, "seconds": [], "first_call_seconds": time.perf_counter() - start}
    for call in range(calls):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["epoch"](run["state"], images, labels, jax.random.PRNGKey(call + 1))
            jax.block_until_ready(metrics)
            run["seconds"].append(time.perf_counter() - start)
    rates = {name: [steps * batch / s for s in run["seconds"]] for name, run in runs.items()}
    baseline = rates["xla/steps"]
    return {
        "steps_per_call": steps,
        "img_per_s": {name: common.summarize(values) for name, values in rates.items()},
        "speedup_over_xla_steps": {name: common.ratio_summary(values, baseline) for name, values in rates.items()},
        "first_call_seconds": {name: run["first_call_seconds"] for name, run in runs.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        f"oneDNN and Winograd vs XLA convolutions, {result.get('model', 'custom_resnet')}, width {result['width']:g}, batch {result['batch']}, {result['machine']['cpu_model']}, "
        f"{result['threads']} threads",
        "",
        "| shape (N,H,W,in,out) | x | XLA fwd / in-grad / w-grad ms | oneDNN fwd / in-grad / w-grad ms "
        "| Winograd fwd / in-grad / w-grad ms | rel. difference oneDNN; Winograd | oneDNN kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    names = [name for name in ("xla", "onednn", "winograd") if name in result["layers"][0]["ms"]]
    for row in result["layers"]:
        ms, differences = row["ms"], row["relative_difference"]
        lines.append(
            f"| {tuple(row['shape'])} | {row['count']} | "
            + " | ".join(" / ".join(f"{v:.2f}" for v in ms[name].values()) for name in names) + " | "
            + "; ".join(" / ".join(f"{v:.0e}" for v in differences[name].values()) for name in names[1:])
            + f" | {str(row['onednn_kernels']).replace(' | ', ', ')} |"  # its names are joined by ' | '
        )
    total = {name: sum(row["count"] * sum(row["ms"][name].values()) for row in result["layers"]) for name in names}
    lines.append("| all convolutions of one step | | " + " | ".join(f"{total[name]:.1f}" for name in names) + " | | |")
    limit = result.get("max_channel_product")
    lines.append("\nconv_backend onednn takes " + ("every one of them (AVX-512 kernels)" if limit is None else
                 f"those of at most {limit} channels in x out (AVX2 kernels), XLA the others"))
    if "step" in result:
        step = result["step"]
        lines += ["", "| train epoch: conv_backend / loop | img/s (median) | pairwise speedup over xla/steps (min-max) |",
                  "|---|---|---|"]
        for name, rate in step["img_per_s"].items():
            speedup = step["speedup_over_xla_steps"][name]
            lines.append(f"| {name} | {rate['median']:.0f} | {speedup['median']:.3f} ({speedup['min']:.3f}-{speedup['max']:.3f}, "
                         f"{speedup['n']} pairs) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onednn_conv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("custom_resnet", "airbench94"), default="custom_resnet",
                        help="whose convolution shapes are timed (the train-step comparison is the custom ResNet's)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per convolution (after 2 warm-up calls)")
    parser.add_argument("--steps", type=int, default=8, help="train steps per timed call of the train-step comparison")
    parser.add_argument("--calls", type=int, default=16, help="timed calls of each train step (0: skip the comparison)")
    parser.add_argument("--threads", type=int, default=common.available_cores())
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    os.environ.update(common.thread_environment(args.threads))  # before JAX starts
    common.pin_to_cores(args.threads)

    result = {"model": args.model, "width": args.width, "batch": args.batch, "threads": args.threads, "machine": common.machine_record(),
              "packages": common.package_versions(), "git": common.git_commit()}
    result["max_channel_product"] = onednn.default().max_channel_product  # the rule `conv_backend` onednn follows here
    result["native_bf16"] = onednn.default().native_bf16  # and whether it takes bf16 convolutions
    result["layers"] = measure_layers(args.width, args.batch, args.repeats, args.model)
    if args.calls:
        result["step"] = measure_step(args.width, args.batch, args.steps, args.calls)
    print(markdown(result))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = "onednn" if args.model == "custom_resnet" else f"onednn-{args.model}"
    path = pathlib.Path(args.out) / f"{prefix}-w{args.width:g}-b{args.batch}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
