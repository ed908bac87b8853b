"""Prototype: oneDNN convolution primitives called from JAX through XLA's FFI, against XLA's own
convolutions: `python -m benchmarks.onednn_conv`.

XLA:CPU runs convolutions through Eigen; PyTorch's CPU convolutions are oneDNN's. This
prototype decides whether jaxres should call oneDNN itself. `onednn_conv.cc` (next to this
file) wraps the 3x3 / stride 1 / padding 1 float32 convolution of the custom ResNet, NHWC
activations and HWIO weights, as three FFI handlers (forward, gradient of the input,
gradient of the weights); `conv3x3` here is a `jax.custom_vjp` over them. The script:

1. builds the library once into the jaxres cache (g++, the `onednn-cpu-gomp` and
   `onednn-devel-cpu-gomp` wheels: ``pip install -e ".[bench]"``);
2. times forward, input gradient and weight gradient of every convolution shape of the
   model (`--width`, `--batch`), XLA against oneDNN, in one process (medians), with their
   relative difference and oneDNN's kernel names;
3. times the whole jitted train step (`jaxres.train.make_train_epoch`) with XLA's
   convolutions and with oneDNN's, alternating calls in one process, and reports the
   median of the pairwise speedups.

Results: stdout (markdown) and benchmarks/results/onednn-<width>-<batch>-<UTC time>.json.
The measured decision is in benchmarks/README.md ("What each change gained"). jaxres itself
does not use this code.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
HEADER_DISTRIBUTION = "onednn-devel-cpu-gomp"
LIBRARY_DISTRIBUTION = "onednn-cpu-gomp"
TARGETS = {
    "forward": "JaxresOnednnConvForward",
    "backward_data": "JaxresOnednnConvBackwardData",
    "backward_weights": "JaxresOnednnConvBackwardWeights",
}
_loaded: dict = {}


def _distribution_file(name: str, suffix: str) -> pathlib.Path | None:
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        path = pathlib.Path(file.locate()).resolve()
        if path.as_posix().endswith(suffix):
            return path
    return None


def locate() -> tuple[pathlib.Path, pathlib.Path]:
    """(include folder, lib folder) of the oneDNN wheels; FileNotFoundError naming what to install."""
    header = _distribution_file(HEADER_DISTRIBUTION, "include/oneapi/dnnl/dnnl.hpp")
    library = _distribution_file(LIBRARY_DISTRIBUTION, "lib/libdnnl.so")
    missing = [name for name, path in ((LIBRARY_DISTRIBUTION, library), (HEADER_DISTRIBUTION, header)) if path is None]
    if missing:
        raise FileNotFoundError(f"oneDNN is not installed: pip install {' '.join(missing)} (or -e \".[bench]\")")
    return header.parents[2], library.parent


def build(include: pathlib.Path, lib: pathlib.Path, folder: pathlib.Path | None = None) -> pathlib.Path:
    """Compile onednn_conv.cc into the jaxres cache (once per source, oneDNN and jaxlib) and
    return the shared library's path. The file appears whole or not at all (os.replace)."""
    import jax

    from jaxres import runtime

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++ or c++) on PATH to build benchmarks/onednn_conv.cc")
    ffi_include = pathlib.Path(jax.ffi.include_dir())
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{include}|{lib}|{compiler}|{importlib.metadata.version('jaxlib')}".encode()
    ).hexdigest()[:16]
    folder = folder or runtime.cache_root() / "onednn" / key
    target = folder / "libjaxres_onednn_conv.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = pathlib.Path(scratch) / target.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(SOURCE), f"-I{include}",
                   f"-I{ffi_include}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(built)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        os.replace(built, target)
    return target


def load() -> ctypes.CDLL:
    """Build (if needed) and load the library, registering its FFI targets with JAX once."""
    if "library" not in _loaded:
        import jax

        library = ctypes.cdll.LoadLibrary(str(build(*locate())))
        for target in TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
        library.JaxresOnednnImplementations.restype = ctypes.c_char_p
        _loaded["library"] = library
    return _loaded["library"]


def implementations(batch: int, height: int, width: int, in_channels: int, out_channels: int) -> str:
    """oneDNN's names for the kernels it picked for one shape: "forward | input grad | weight grad"."""
    return load().JaxresOnednnImplementations(batch, height, width, in_channels, out_channels).decode()


def _call(target: str, shape: tuple, *operands):
    import jax
    import jax.numpy as jnp

    load()
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(TARGETS[target], result, vmap_method="sequential")(*operands)


def _conv3x3(x, w):
    return _call("forward", x.shape[:3] + (w.shape[3],), x, w)


def _conv3x3_forward(x, w):
    return _conv3x3(x, w), (x, w)


def _conv3x3_backward(residuals, g):
    x, w = residuals
    return _call("backward_data", x.shape, g, w), _call("backward_weights", w.shape, x, g)


def conv3x3(x, w):
    """float32 x[N,H,W,Ci] (*) w[3,3,Ci,Co], stride 1, padding 1 -> [N,H,W,Co], by oneDNN,
    differentiable once (a `jax.custom_vjp` whose backward is oneDNN's two gradients)."""
    import jax

    if "conv3x3" not in _loaded:
        function = jax.custom_vjp(_conv3x3)
        function.defvjp(_conv3x3_forward, _conv3x3_backward)
        _loaded["conv3x3"] = function
    return _loaded["conv3x3"](x, w)


def xla_conv3x3(x, w):
    import jax

    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def handles(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
            feature_group_count=1, batch_group_count=1, **_) -> bool:
    """Whether `conv3x3` computes this `lax.conv_general_dilated` call (as flax's nn.Conv makes it)."""
    import jax.numpy as jnp

    specs = (getattr(dimension_numbers, "lhs_spec", None), getattr(dimension_numbers, "rhs_spec", None))
    return (
        specs == ((0, 3, 1, 2), (3, 2, 0, 1)) and rhs.shape[:2] == (3, 3)
        and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
        and tuple(window_strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1 and batch_group_count == 1
    )


@contextlib.contextmanager
def onednn_convolutions():
    """Within: every flax `nn.Conv` built (and so every model traced) uses `conv3x3` for the
    convolutions it `handles`, XLA's for the others. Only for this benchmark process."""
    import flax.linen as nn
    import jax

    def dispatch(lhs, rhs, window_strides, padding, *args, **kwargs):
        if isinstance(padding, str) or not handles(lhs, rhs, window_strides, padding, *args, **kwargs):
            return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
        return conv3x3(lhs, rhs)

    original = nn.Conv
    nn.Conv = functools.partial(original, conv_general_dilated=dispatch)
    try:
        yield
    finally:
        nn.Conv = original


def model_shapes(width: float, batch: int) -> list[tuple[int, int, int, int, int]]:
    """(batch, size, size, in, out) of each distinct 3x3 convolution of the custom ResNet, with
    how many times it occurs."""
    from jaxres.models import scaled_channels

    c = lambda n: scaled_channels(n, width)  # noqa: E731
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


def measure_layers(width: float, batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    rows = []
    for (n, h, w, ci, co), count in model_shapes(width, batch):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, h, w, ci), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, ci, co), dtype=np.float32) / np.sqrt(9 * ci))
        g = jnp.asarray(rng.standard_normal((n, h, w, co), dtype=np.float32))
        row = {"shape": [n, h, w, ci, co], "count": count, "ms": {}, "relative_difference": {}}
        outputs = {}
        for name, conv in (("xla", xla_conv3x3), ("onednn", conv3x3)):
            ops = {
                "forward": jax.jit(conv),
                "input_grad": jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
                "weight_grad": jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
            }
            args = {"forward": (x, k), "input_grad": (x, k, g), "weight_grad": (x, k, g)}
            outputs[name] = {op: f(*args[op]) for op, f in ops.items()}
            row["ms"][name] = {
                op: _median_ms(lambda f=f, a=args[op]: jax.block_until_ready(f(*a)), repeats) for op, f in ops.items()
            }
        for op in outputs["xla"]:
            a, b = np.asarray(outputs["xla"][op], np.float64), np.asarray(outputs["onednn"][op], np.float64)
            row["relative_difference"][op] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        row["onednn_kernels"] = implementations(n, h, w, ci, co)
        rows.append(row)
    return rows


def measure_step(width: float, batch: int, steps: int, calls: int) -> dict:
    """The jitted train step (make_train_epoch of `steps` steps) with XLA's and with oneDNN's
    convolutions, alternating calls; img/s medians and the pairwise speedup."""
    import jax

    from benchmarks.profile_jax import random_variables
    from jaxres import models, optim, parallel, train
    from jaxres.config import TrainConfig

    config = TrainConfig(width=width, batch_size=batch)
    optimizer, _ = optim.make_optimizer(config, steps)
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = parallel.replicate(mesh, rng.integers(0, 256, (max(4096, batch * steps), 32, 32, 3), dtype=np.uint8))
    labels = parallel.replicate(mesh, rng.integers(0, 10, (images.shape[0],), dtype=np.int32))
    runs = {}
    for name in ("xla", "onednn"):
        context = onednn_convolutions() if name == "onednn" else contextlib.nullcontext()
        with context:  # the model is built and its step traced (first call) inside
            model = models.from_config(config, num_classes=10)
            state = train.init_train_state(config, optimizer, random_variables(model))
            epoch = train.make_train_epoch(model, optimizer, config, mesh, steps)
            start = time.perf_counter()
            state, metrics = epoch(parallel.replicate_tree(mesh, state), images, labels, jax.random.PRNGKey(0))
            jax.block_until_ready(metrics)
            runs[name] = {"epoch": epoch, "state": state, "seconds": [], "first_call_seconds": time.perf_counter() - start}
    for call in range(calls):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["epoch"](run["state"], images, labels, jax.random.PRNGKey(call + 1))
            jax.block_until_ready(metrics)
            run["seconds"].append(time.perf_counter() - start)
    rates = {name: [steps * batch / s for s in run["seconds"]] for name, run in runs.items()}
    return {
        "steps_per_call": steps,
        "img_per_s": {name: common.summarize(values) for name, values in rates.items()},
        "onednn_speedup": common.ratio_summary(rates["onednn"], rates["xla"]),
        "first_call_seconds": {name: run["first_call_seconds"] for name, run in runs.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        f"oneDNN vs XLA convolutions, width {result['width']:g}, batch {result['batch']}, {result['machine']['cpu_model']}, "
        f"{result['threads']} threads",
        "",
        "| shape (N,H,W,in,out) | x | XLA fwd / in-grad / w-grad ms | oneDNN fwd / in-grad / w-grad ms | rel. difference | oneDNN kernels |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["layers"]:
        ms = row["ms"]
        lines.append(
            f"| {tuple(row['shape'])} | {row['count']} | " + " / ".join(f"{v:.2f}" for v in ms["xla"].values()) + " | "
            + " / ".join(f"{v:.2f}" for v in ms["onednn"].values()) + " | "
            + " / ".join(f"{v:.0e}" for v in row["relative_difference"].values()) + f" | {row['onednn_kernels']} |"
        )
    total = {name: sum(row["count"] * sum(row["ms"][name].values()) for row in result["layers"]) for name in ("xla", "onednn")}
    lines.append(f"| all convolutions of one step | | {total['xla']:.1f} | {total['onednn']:.1f} | | |")
    if "step" in result:
        step = result["step"]
        rates = step["img_per_s"]
        speedup = step["onednn_speedup"]
        lines += ["", f"train step: XLA {rates['xla']['median']:.0f} img/s, oneDNN {rates['onednn']['median']:.0f} img/s; "
                  f"pairwise speedup median {speedup['median']:.3f} (min {speedup['min']:.3f}, max {speedup['max']:.3f}, "
                  f"{speedup['n']} pairs)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onednn_conv", description=__doc__.split("\n\n")[0])
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
    import jaxres  # noqa: F401  (jaxres's XLA defaults before JAX starts)

    result = {"width": args.width, "batch": args.batch, "threads": args.threads, "machine": common.machine_record(),
              "packages": common.package_versions(), "git": common.git_commit()}
    result["layers"] = measure_layers(args.width, args.batch, args.repeats)
    if args.calls:
        result["step"] = measure_step(args.width, args.batch, args.steps, args.calls)
    print(markdown(result))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = pathlib.Path(args.out) / f"onednn-w{args.width:g}-b{args.batch}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
