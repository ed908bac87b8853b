"""What both sides of the benchmarks share: statistics, the worker protocol, the machine record.

Nothing here imports jax or torch (the orchestrator stays light, and each worker imports
only its own framework).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SCRATCH_DIR = RESULTS_DIR / "tmp"  # git-ignored: worker logs, shared weights, profiles
MARKER = "@@bench "  # prefix of the protocol lines a worker writes to its stdout
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "jax-cuda12-plugin", "jax-cuda13-plugin", "psutil")


# --------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict:
    """{median, min, max, n, values} of a non-empty list of numbers."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """[a_i / b_i]: the ratio of each pair of alternating runs (repeat i of A against repeat i of B)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"pairwise ratios need as many runs on each side, got {len(numerators)} and {len(denominators)}")
    if any(b <= 0 for b in denominators):
        raise ValueError("pairwise ratios need positive denominators")
    return [float(a) / float(b) for a, b in zip(numerators, denominators)]


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict:
    """Median and min-max of the pair-by-pair ratios (not the ratio of the medians)."""
    return summarize(pairwise_ratios(numerators, denominators))


def throughputs(measurements: Sequence[dict]) -> list[float]:
    """images / seconds of each measurement ({images, seconds})."""
    return [m["images"] / m["seconds"] for m in measurements]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def weights_digest(path: Path | str) -> str:
    """A digest of the arrays in an npz of weights (names, dtypes, shapes, bytes; not the zip
    file's own bytes, which carry timestamps): equal digests, the same initial weights."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    with np.load(path) as archive:
        for name in sorted(archive.files):
            array = np.ascontiguousarray(archive[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- worker protocol


def protocol_stream() -> TextIO:
    """The worker's channel to the orchestrator: the original stdout. Everything else that
    writes to fd 1 afterwards (libraries, C code) is sent to stderr instead."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def emit(stream: TextIO, message: dict) -> None:
    stream.write(MARKER + json.dumps(message) + "\n")
    stream.flush()


def parse_message(line: str) -> dict | None:
    """The message on a protocol line, or None for any other line."""
    if not line.startswith(MARKER):
        return None
    return json.loads(line[len(MARKER) :])


# --------------------------------------------------------------------------- threads


def thread_environment(threads: int, base: dict | None = None) -> dict:
    """Environment giving a worker `threads` compute threads in either framework.

    OpenMP/MKL (PyTorch's CPU kernels) read OMP_NUM_THREADS / MKL_NUM_THREADS; XLA:CPU sizes
    its intra-op pool from the cores the process may run on, so the worker pins itself to
    `threads` cores (`pin_to_cores`) and calls torch.set_num_threads. XLA_FLAGS gets only
    `--xla_cpu_multi_thread_eigen=true`. (An earlier version also added a bare
    `intra_op_parallelism_threads=N`: that is no XLA flag, and XLA stops reading XLA_FLAGS at a
    token without "--", so every flag after it was silently dropped; it is removed here too.)
    """
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f.startswith("--") and not f.startswith("--xla_cpu_multi_thread_eigen")]
    flags.append("--xla_cpu_multi_thread_eigen=true")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def pin_to_cores(threads: int) -> list[int]:
    """Restrict this process to the first `threads` of its allowed cores; returns them."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []
    chosen = allowed[: max(1, threads)]
    if len(chosen) < len(allowed):
        os.sched_setaffinity(0, chosen)
    return chosen


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- machine record


def first_cpu_fields(cpuinfo: str | None = None) -> dict:
    """The first CPU's block of /proc/cpuinfo (or of the text given) as {lower-case key: value};
    {} where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first CPU's block only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model() -> str:
    return first_cpu_fields().get("model name") or platform.processor() or platform.machine()


# The vector extensions that decide a CPU's convolution speed (the model name alone does not:
# "AMD EPYC" has named both an AVX2-only and an AVX-512 machine)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features(cpuinfo: str | None = None) -> dict:
    """{family, model, features: those of CPU_FEATURES the first CPU lists} from /proc/cpuinfo
    (or the text given); {} where there is none (not Linux) or it lists no flags (not x86)."""
    fields = first_cpu_fields(cpuinfo)
    if "flags" not in fields:  # not an x86 CPU's cpuinfo: unknown, not "no AVX"
        return {}
    flags = set(fields["flags"].split())
    return {"family": fields.get("cpu family"), "model": fields.get("model"), "features": [f for f in CPU_FEATURES if f in flags]}


def gpu_info() -> list[dict]:
    """[{name, memory_total, driver}] from nvidia-smi, or [] without an NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_total": parts[1], "driver": parts[2]})
    return gpus


def package_versions(names: Sequence[str] = PACKAGES) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(root: Path = REPO_ROOT) -> dict:
    """{commit, dirty} of the working tree (None when git is unavailable)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def memory_total_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def machine_record() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu": cpu_features(),
        "cpu_cores": os.cpu_count(),
        "cores_available": available_cores(),
        "memory_gib": memory_total_gib(),
        "gpus": gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "malloc": malloc_record(),
    }


def malloc_record() -> dict:
    """How glibc's malloc is set in the processes this one starts (they inherit its environment):
    "jaxres": "kept" where `python -m jaxres.train` sets it to keep freed memory
    (jaxres/runtime.py; the workers of benchmarks.run, both sides, keep glibc's defaults), else
    why not; "GLIBC_TUNABLES": the environment's, which every process reads when it starts."""
    from jaxres import runtime

    return {"jaxres": runtime.malloc_left_alone_because(os.environ) or "kept", "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}


def random_variables(model, seed: int) -> dict:
    """Random weights, BatchNorm affines and running statistics for a jaxres `model`, drawn
    with NumPy (the tests' and cam_parity's weights; cheaper than `init_variables`, whose
    PRNG programs take long to compile on CPU). Kernels are U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) as PyTorch's default; variances and scales U(0.5, 1.5); means and
    biases N(0, 0.2): nothing is trivial. jax is imported here, not at the top, so the
    PyTorch workers that import this module never load it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from jaxres.models import init_variables

    rng = np.random.default_rng(seed)
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    out = {}
    for collection, tree in template.items():
        new = {}
        for path, leaf in traverse_util.flatten_dict(tree).items():
            shape, name = leaf.shape, path[-1]
            if name == "kernel":
                array = rng.uniform(-1, 1, shape) / np.sqrt(int(np.prod(shape[:-1])))
            elif name in ("var", "scale"):
                array = rng.uniform(0.5, 1.5, shape)
            else:  # mean, bias
                array = rng.normal(0.0, 0.2, shape)
            new[path] = jnp.asarray(array, jnp.float32)
        out[collection] = traverse_util.unflatten_dict(new)
    return out
