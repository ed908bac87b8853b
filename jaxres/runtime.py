"""The XLA and JAX settings jaxres makes by default, applied once when `jaxres` is imported.

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

A user's own setting always wins: an ``XLA_FLAGS`` that already names either option, or a
``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config``'s ``jax_compilation_cache_dir``) already
set, is left alone. ``JAXRES_XLA_DEFAULTS=0`` turns both defaults off;
``JAXRES_COMPILATION_CACHE=0`` turns off only the cache, and ``JAXRES_COMPILATION_CACHE=DIR``
puts it in DIR.

XLA reads ``XLA_FLAGS`` once, when its first backend starts, so the flag applies only if
jaxres is imported before any JAX computation runs (importing jax itself is fine). Nothing
here imports jax: the data loader and the PyTorch side of the benchmarks import jaxres
without it.
"""

from __future__ import annotations

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
