"""The settings jaxres makes by default: XLA's and JAX's once when `jaxres` is imported (1, 2),
glibc malloc's when the train command starts (3).

1. XLA:CPU's experimental YNNPACK fusions are switched off
   (``--xla_cpu_experimental_ynn_fusion_type=`` added to ``XLA_FLAGS``). With them this
   model's train step runs at about half the speed, or less, on every CPU measured.
   Dropping only ``individual_convolution`` from the default list is as fast within the
   noise, but computes differently from "all off"; the empty list is the simplest setting
   and the one measured everywhere. The option only concerns the CPU backend; GPU/TPU ignore it.
   XLA:CPU's newer MLIR fusion emitters are switched off as well
   (``--xla_cpu_use_fusion_emitters=false``): the same train step then compiles faster,
   runs as fast, and computes the same bits (the loss after 48 steps is identical at widths
   0.25 and 1). Both are measured in benchmarks/README.md, "What each change gained".
2. JAX's persistent compilation cache is turned on, in a folder of the jaxres cache
   (``$JAXRES_CACHE``, else ``~/.cache/jaxres``) named after the jaxlib version and the
   CPU, so a second run of the same command loads its compiled programs instead of
   compiling them again (the train step takes seconds to compile on a CPU: README.md's
   Results, the compile table).

3. The train command (`python -m jaxres.train`, not the import) has glibc's malloc keep the
   memory the process frees for its next allocations (on Linux with glibc: one arena, no
   mmap, no trimming, set with `mallopt`, `keep_freed_memory`). XLA:CPU allocates each
   call's temporaries as one block (463 MiB for airbench94's train step at batch 256) and
   frees it at the end; glibc hands a block that large back to the kernel (munmap) and the
   next call faults every page in again, zero-filled by the kernel: 118,000 page faults and
   about 10 % of the step's CPU time in the kernel. Kept, the next step reuses the pages.
   The process's resident memory then stays at its peak instead of shrinking between calls,
   and compiling is slower (airbench94's step at batch 256: 3.2 -> 4.6-5.1 s, single runs on
   a 2-core AMD EPYC): worth it in a training process, whose steps dominate, not at import,
   where notebooks and Grad-CAM mostly compile.

A user's own setting always wins: an ``XLA_FLAGS`` that already names either option, or a
``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config``'s ``jax_compilation_cache_dir``) already
set, is left alone, and so is malloc when ``GLIBC_TUNABLES`` names a ``glibc.malloc`` tunable
or a ``MALLOC_*`` variable of glibc's is set. ``JAXRES_XLA_DEFAULTS=0`` turns all the defaults
off; ``JAXRES_MALLOC=system`` only the malloc setting;
``JAXRES_COMPILATION_CACHE=0`` turns off only the cache, and ``JAXRES_COMPILATION_CACHE=DIR``
puts it in DIR.

XLA reads ``XLA_FLAGS`` once, when its first backend starts, so the flag applies only if
jaxres is imported before any JAX computation runs (importing jax itself is fine). Nothing
here imports jax: the data loader and the PyTorch side of the benchmarks import jaxres
without it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import sys
from typing import MutableMapping

DEFAULTS_VARIABLE = "JAXRES_XLA_DEFAULTS"  # "0": none of the defaults below
CACHE_VARIABLE = "JAXRES_CACHE"  # the jaxres cache folder (decoded datasets, compiled programs)
COMPILATION_CACHE_VARIABLE = "JAXRES_COMPILATION_CACHE"  # "0": no compilation cache; else a folder
OWN_CACHE_VARIABLE = "JAXRES_DEFAULT_COMPILATION_CACHE_DIR"  # the folder jaxres itself chose (see apply_defaults)
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
FUSION_EMITTERS_OPTION = "xla_cpu_use_fusion_emitters"
# YNNPACK fusions off, the legacy fusion emitters (see the module docstring)
CPU_XLA_FLAGS = (f"--{YNN_FUSION_OPTION}=", f"--{FUSION_EMITTERS_OPTION}=false")
# Programs that compile faster than this are not worth a disk entry. JAX's default, 1 s, would
# leave out the evaluation step and Grad-CAM, which compile in about a second on a CPU
# (measured in benchmarks/README.md, "What each change gained").
MIN_COMPILE_SECONDS_TO_CACHE = "0.3"
OFF = ("0", "false", "no", "off")
MALLOC_VARIABLE = "JAXRES_MALLOC"  # "system" (or 0, off, ...): leave glibc's malloc as it is
# glibc's mallopt parameters (malloc.h) and what jaxres sets: every thread allocates from the
# main arena (a thread's own arena would mmap a block that large whatever M_MMAP_MAX says),
# never with mmap, and the top of the heap is never trimmed (-1: "disables trimming completely")
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_FREED_MEMORY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# the same as glibc tunables, for a process that does not import jaxres (read when it starts)
GLIBC_TUNABLES_KEEPING_FREED_MEMORY = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"
)
# a user's own malloc settings, read by glibc when the process starts
GLIBC_MALLOC_VARIABLES = (
    "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)  # fmt: skip
# what this process did about malloc: "kept" (the train command) or why it left malloc alone
malloc_setting = "glibc's defaults (only the train command keeps freed memory)"


def cache_root(environ: MutableMapping[str, str] = os.environ) -> pathlib.Path:
    """The jaxres cache folder: $JAXRES_CACHE, else ~/.cache/jaxres."""
    return pathlib.Path(environ.get(CACHE_VARIABLE) or "~/.cache/jaxres").expanduser()


def defaults_enabled(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether jaxres applies its XLA defaults: False when $JAXRES_XLA_DEFAULTS is 0, false, no
    or off (any case), True otherwise (also when unset)."""
    return environ.get(DEFAULTS_VARIABLE, "1").strip().lower() not in OFF


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` plus jaxres's CPU flags, except those whose option it already sets."""
    flags = xla_flags.split()
    for flag in CPU_XLA_FLAGS:
        option = flag.split("=", 1)[0]
        if not any(f == option or f.startswith(option + "=") for f in flags):
            flags.append(flag)
    return " ".join(flags)


def cpu_fingerprint() -> str:
    """A short digest of the CPU model and its instruction-set flags: compiled CPU programs
    are only reused on the same kind of CPU (an AVX-512 program must not run on an AVX2 one)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def malloc_left_alone_because(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Why jaxres leaves glibc's malloc as it is in this process, or None when it sets it."""
    if not defaults_enabled(environ):
        return f"{DEFAULTS_VARIABLE} is off"
    if environ.get(MALLOC_VARIABLE, "").strip().lower() in ("system", *OFF):
        return f"{MALLOC_VARIABLE}={environ[MALLOC_VARIABLE]}"
    own = [name for name in GLIBC_MALLOC_VARIABLES if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        own.insert(0, "GLIBC_TUNABLES")
    if own:
        return f"the user's own malloc settings ({', '.join(own)})"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a glibc system (macOS, musl, Windows)
        libc = ""
    if not libc.startswith("glibc"):
        return "not glibc's malloc"
    return None


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ, mallopt=None) -> str:
    """Set `KEEP_FREED_MEMORY` with glibc's `mallopt` (point 3 of the module docstring) unless
    `malloc_left_alone_because` gives a reason; returns "kept" or that reason. The setting is
    the whole process's: `mallopt` is `ctypes.CDLL(None).mallopt` unless a test passes its own."""
    reason = malloc_left_alone_because(environ)
    if reason is not None:
        return reason
    if mallopt is None:
        mallopt = ctypes.CDLL(None).mallopt
    refused = [parameter for parameter, value in KEEP_FREED_MEMORY if mallopt(parameter, value) != 1]
    return "kept" if not refused else f"mallopt refused parameters {refused}"


def compilation_cache_dir(environ: MutableMapping[str, str] = os.environ) -> pathlib.Path | None:
    """Where compiled programs are cached, or None when the cache is turned off."""
    setting = environ.get(COMPILATION_CACHE_VARIABLE, "").strip()
    if setting.lower() in OFF or not defaults_enabled(environ):
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        jaxlib_version = "unknown"
    return cache_root(environ) / "compiled" / f"jaxlib-{jaxlib_version}-{cpu_fingerprint()}"


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the defaults of the module docstring in `environ` (and in jax.config when jax is
    already imported), leaving the user's own settings alone.

    Child processes inherit the environment, so the cache folder jaxres itself put in
    JAX_COMPILATION_CACHE_DIR is recorded in JAXRES_DEFAULT_COMPILATION_CACHE_DIR: a child
    that finds the two equal knows it is jaxres's default, not the user's own setting, and
    decides again from its own JAXRES_* variables.
    """
    inherited = environ.pop(OWN_CACHE_VARIABLE, None)
    if inherited is not None and environ.get("JAX_COMPILATION_CACHE_DIR") == inherited:
        del environ["JAX_COMPILATION_CACHE_DIR"]
    jax = sys.modules.get("jax") if environ is os.environ else None  # jax read its environment already
    if jax is not None and inherited is not None and jax.config.jax_compilation_cache_dir == inherited:
        jax.config.update("jax_compilation_cache_dir", None)
    if not defaults_enabled(environ):
        return
    environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))
    folder = compilation_cache_dir(environ)
    if folder is None or environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    environ["JAX_COMPILATION_CACHE_DIR"] = environ[OWN_CACHE_VARIABLE] = str(folder)
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_SECONDS_TO_CACHE)
    if jax is not None and not jax.config.jax_compilation_cache_dir:  # tell jax too
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(MIN_COMPILE_SECONDS_TO_CACHE))
