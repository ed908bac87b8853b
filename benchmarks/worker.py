"""One framework, one task, in its own process: `python -m benchmarks.worker --framework jax ...`.

The orchestrator (`benchmarks.run`) starts one worker per framework (and pipeline) for each
measured configuration and talks to it over a line protocol: the worker writes
`@@bench {json}` lines to its stdout (everything else goes to stderr) and reads commands
from stdin.

Repeated tasks (train, eval, gradcam):

    -> {"event": "ready", ...setup, warm-up and compile times}   after setup and warm-up
    <- measure        -> {"event": "measurement", "images": n, "seconds": s, ...}
    <- finish         -> {"event": "finished", ...peak memory}   and the worker exits

One-shot tasks (parity, accuracy) write one {"event": "result", ...} and exit.
Failures are reported as {"event": "error", "error": "..."} and a non-zero exit status.

The worker imports only its own framework; both read the same decoded CIFAR-10 arrays
(`jaxres.data.load_dataset`'s cache, which needs no jax) or the same seeded synthetic ones.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import traceback

import numpy as np

from benchmarks import common

TASKS = ("parity", "train", "eval", "gradcam", "accuracy")
REPEATED_TASKS = ("train", "eval", "gradcam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("jax", "torch"), required=True)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=common.available_cores(), help="compute threads (and cores pinned)")
    p.add_argument("--data", default="synthetic", help="CIFAR-10 source for jaxres.data.load_dataset, or 'synthetic'")
    p.add_argument("--cache-dir", default=None, help="decoded-array cache (default: $JAXRES_CACHE or ~/.cache/jaxres)")
    p.add_argument("--weights", help="npz of the PyTorch state_dict both sides load (see --save-weights)")
    p.add_argument("--save-weights", action="store_true", help="parity, torch: create --weights first")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--norm", default="batch")
    p.add_argument("--batch", type=int, default=128, help="train batch size")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--steps", type=int, default=8, help="train: optimizer steps per measurement")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--gradcam-images", type=int, default=256)
    p.add_argument("--gradcam-batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed measurements before 'ready' (the first one compiles)")
    # PyTorch side
    p.add_argument("--pipeline", choices=("device", "loader"), default="device", help="torch train: input pipeline")
    p.add_argument("--loader-workers", type=int, default=2, help="torch loader pipeline: DataLoader num_workers")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="torch: memory format (auto = on)")
    p.add_argument("--torch-compile", action="store_true", help="torch: torch.compile the model")
    # JAX side
    p.add_argument("--epoch-loop", default="auto", help="jax: TrainConfig.epoch_loop (auto: scan, or steps on a CPU when a step has an XLA convolution)")
    p.add_argument("--conv-backend", default="auto", help="jax: TrainConfig.conv_backend (auto: oneDNN's on a one-device CPU)")
    # accuracy
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--accuracy-batch", type=int, default=512)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--target", type=float, default=None, help="accuracy: report the time to reach this test accuracy")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="accuracy: also evaluate the final model with this test-time augmentation (flip: image and mirror)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parity-images", type=int, default=64)
    return p


def load_arrays(data: str, cache_dir: str | None, seed: int = 0) -> dict:
    """{train_images uint8[N,32,32,3], train_labels int32[N], test_images, test_labels, source}."""
    if data == "synthetic":
        rng = np.random.default_rng(seed)
        return {
            "train_images": rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, (50000,), dtype=np.int32),
            "test_images": rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, (10000,), dtype=np.int32),
            "source": "synthetic uniform noise (seeded)",
        }
    from jaxres.data import load_dataset  # NumPy and Pillow only: no jax

    dataset = load_dataset(data, cache_dir=cache_dir, progress=False)
    return {
        "train_images": dataset.train.images,
        "train_labels": dataset.train.labels.astype(np.int32),
        "test_images": dataset.test.images,
        "test_labels": dataset.test.labels.astype(np.int32),
        "source": dataset.source,
    }


def peak_host_memory() -> dict:
    """Peak resident memory of this process (and the current total of its children, e.g.
    DataLoader workers), in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        out["children_rss_mib"] = sum(c.memory_info().rss for c in children) / 2**20
    except Exception:  # noqa: BLE001  (psutil absent or a child just exited)
        pass
    return out


def serve(session, stream) -> None:
    """The measure/finish loop of a repeated task."""
    for line in sys.stdin:
        command = line.strip()
        if command == "measure":
            common.emit(stream, {"event": "measurement", **session.measure()})
        elif command == "finish":
            common.emit(stream, {"event": "finished", **peak_host_memory(), **session.device_memory()})
            return
        elif command:
            common.emit(stream, {"event": "error", "error": f"unknown command {command!r}"})


def warm_up(session, count: int) -> dict:
    """Run `count` untimed measurements; the first includes compilation (reported apart)."""
    info = {}
    for index in range(max(1, count)):
        result = session.measure()
        if index == 0:
            info["first_call_seconds"] = result["seconds"]
            if "compile_seconds" in result:
                info["compile_seconds"] = result["compile_seconds"]
        else:
            info["warm_seconds"] = result["seconds"]
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stream = common.protocol_stream()
    started = time.perf_counter()
    try:
        cores = common.pin_to_cores(args.threads) if args.device == "cpu" else []
        arrays = load_arrays(args.data, args.cache_dir, args.seed)
        if args.framework == "jax":
            from benchmarks import worker_jax as side
        else:
            from benchmarks import worker_torch as side
        threads = side.configure_threads(args.threads)
        if args.task in REPEATED_TASKS:
            session = side.make_session(args, arrays)
            setup_seconds = time.perf_counter() - started
            info = warm_up(session, args.warmup)
            common.emit(
                stream,
                {
                    "event": "ready",
                    "setup_seconds": setup_seconds,
                    "cores": cores,
                    "threads": threads,
                    "data_source": arrays["source"],
                    **session.describe(),
                    **info,
                },
            )
            serve(session, stream)
        else:
            task = side.parity if args.task == "parity" else side.time_to_accuracy
            result = task(args, arrays)
            common.emit(
                stream, {"event": "result", "threads": threads, "data_source": arrays["source"], **result, **peak_host_memory()}
            )
    except Exception as error:  # noqa: BLE001  (reported to the orchestrator, which carries on)
        traceback.print_exc()
        common.emit(stream, {"event": "error", "error": f"{type(error).__name__}: {error}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
