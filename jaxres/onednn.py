"""oneDNN convolutions for XLA:CPU, through JAX's FFI: what the conv_backend "onednn" computes with.

XLA:CPU runs convolutions through Eigen, and its weight gradient first transposes the
activations batch-last; oneDNN (PyTorch's CPU library) computes the custom ResNet's 3x3
convolutions without that, faster on the CPUs measured (the oneDNN rows of
benchmarks/README.md, "What each change gained"; `python -m benchmarks.onednn_conv`).
`onednn_conv.cc` (next to this file) wraps oneDNN's 3x3 / stride 1 / padding 1 float32 and
bfloat16 convolution, NHWC activations and HWIO weights, as three FFI handlers (forward,
input gradient, weight gradient); `Onednn.conv3x3` is a `jax.custom_vjp` over them, its
backward passes custom_vjps too, so that it differentiates in reverse mode to any order.

* Which runs use it is decided once, before any model is built, by `jaxres.backends.resolve`
  ("auto": oneDNN's on a CPU with one device in one process when the library builds). The FFI
  calls have no sharding rule, so with several devices XLA's convolutions keep the batch split.
* Only float32 and bfloat16 3x3 / stride 1 / padding 1 convolutions go to oneDNN
  (`Onednn.handles`); fp16, float64 and every other convolution stay XLA's. float32: where
  oneDNN's kernels are AVX2 ones, only those of at most 128 x 128 channels
  (`max_channel_product`: its wider AVX2 weight gradients lose to XLA's); with AVX-512
  kernels, all of them. bfloat16: only where oneDNN's bfloat16 kernels are native (AMX or
  AVX512-BF16, `native_bf16`), where they are several times faster than XLA's bfloat16
  convolutions, which do not use AMX; all of them there. Both rules are read off oneDNN's
  kernel names (the ISA it dispatches to). They rest on measurements on an AMD EPYC (AVX2)
  and an Intel Xeon (AVX-512, AMX) only (benchmarks/README.md, "What each change gained"):
  another AVX-512 CPU (an AMD Zen 4 with AVX512-BF16, say) takes the Xeon's paths unmeasured.
* All three passes of a convolution it takes are oneDNN's, the weight gradient too: at 8x8
  and 4x4 pixels oneDNN's `jit:avx2` weight gradient alone is the slower, but with no XLA
  convolution left the CPU epoch runs as one `lax.scan`, which gains more than that loses
  (`jaxres.loops`, and benchmarks/README.md).
* The library is built once with the system C++ compiler (g++) against the
  `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels (dependencies on Linux x86-64) into
  ``$JAXRES_CACHE/onednn/``; no compiler or no wheel: "auto" falls back to XLA, saying why once.
  The build writes the library's sha256 beside it and renames both into place; every process
  checks the digest before `dlopen` (a truncated library mapped into the process is a SIGBUS),
  and rebuilds a damaged library, or one that does not load, saying so once.
* Its state (the loaded library, the answers about this CPU, what the user was told) lives in
  one `Onednn` object; `default()` is the process's.

The results equal XLA's to float32 rounding (a sum of the same products in another order;
in bfloat16, float32 sums rounded once to bfloat16, so within bfloat16 rounding of XLA's), not
bitwise: a run is deterministic for a given backend and CPU.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp

from jaxres import runtime

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
HEADER_DISTRIBUTION = "onednn-devel-cpu-gomp"
LIBRARY_DISTRIBUTION = "onednn-cpu-gomp"
TARGETS = {
    "forward": "JaxresOnednnConvForward",
    "backward_data": "JaxresOnednnConvBackwardData",
    "backward_weights": "JaxresOnednnConvBackwardWeights",
}
# The bfloat16 handlers: the same names with this suffix (all operands and results bfloat16).
BF16_SUFFIX = "Bf16"
# Where oneDNN's AVX2 kernels are the faster: the convolutions with at most 128 x 128 channels
# in x out; XLA's above. With AVX-512 kernels oneDNN's are the faster for every convolution of
# the epoch: no limit (measured in benchmarks/README.md, "What each change gained").
AVX2_MAX_CHANNEL_PRODUCT = 128 * 128
# The shape whose weight-gradient kernel tells which ISA oneDNN dispatches to on this CPU: one
# of the wide layers where AVX2's kernel loses (256 -> 512 channels at 8x8 pixels: the width-1
# ResNet-9's layer3 convolution).
ISA_PROBE_SHAPE = (8, 8, 8, 256, 512)


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
        raise FileNotFoundError(f"oneDNN is not installed: pip install {' '.join(missing)}")
    return header.parents[2], library.parent


LIBRARY_NAME = "libjaxres_onednn_conv.so"
DIGEST_SUFFIX = ".sha256"  # beside the library: the sha256 of its bytes, written when it was built


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler (g++ or c++) on PATH to build {SOURCE.name}")
    return compiler


def library_path(include: pathlib.Path, lib: pathlib.Path, folder: pathlib.Path | None = None) -> pathlib.Path:
    """Where `build` puts the library: a folder of the jaxres cache keyed by the source, oneDNN,
    the compiler and jaxlib (or `folder`)."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{include}|{lib}|{_compiler()}|{importlib.metadata.version('jaxlib')}".encode()
    ).hexdigest()[:16]
    return (folder or runtime.cache_root() / "onednn" / key) / LIBRARY_NAME


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage(target: pathlib.Path) -> str | None:
    """None when the library at `target` is the one its build wrote (its sha256 equals the
    digest written beside it), else what is wrong with it (one phrase). Reading it is safe
    whatever its state: only a verified file is ever given to dlopen (a truncated one mapped
    into the process gives SIGBUS)."""
    digest_path = target.with_name(target.name + DIGEST_SUFFIX)
    try:
        digest = digest_path.read_text().strip()
    except FileNotFoundError:
        return "it has no digest beside it (an interrupted build, or an older jaxres's)"
    except (OSError, UnicodeDecodeError) as error:
        return f"its digest {digest_path} is unreadable ({error})"
    try:
        actual = _file_digest(target)
    except OSError as error:
        return f"it is unreadable ({error})"
    if actual != digest:
        return f"its sha256 differs from the one written when it was built (truncated or overwritten: {target.stat().st_size} bytes)"
    return None


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def build(include: pathlib.Path, lib: pathlib.Path, folder: pathlib.Path | None = None, *,
          rebuild: bool = False) -> pathlib.Path:
    """Compile onednn_conv.cc into the jaxres cache (once per source, oneDNN, compiler and
    jaxlib) and return the shared library's path, verified (`damage`): a cached library whose
    bytes differ from its build's digest is rebuilt, saying so once on stderr; `rebuild`
    rebuilds it anyway (it failed to load). The build is atomic: compiled in a scratch folder,
    its digest written beside it, then renamed into place, so a kill at any point leaves the
    old files or a pair that fails verification; concurrent builders take turns (a lock)."""
    compiler = _compiler()
    ffi_include = pathlib.Path(jax.ffi.include_dir())
    target = library_path(include, lib, folder)
    if not rebuild and target.is_file() and damage(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same library: wait for it
        if not rebuild and target.is_file():
            problem = damage(target)
            if problem is None:  # built by that other process meanwhile
                return target
            print(f"jaxres: the cached oneDNN library {target} is damaged: {problem}; rebuilding it", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = pathlib.Path(scratch) / target.name
            command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(SOURCE), f"-I{include}",
                       f"-I{ffi_include}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(built)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
            digest = _file_digest(built)
            os.replace(built, target)
            _write_atomically(target.with_name(target.name + DIGEST_SUFFIX), (digest + "\n").encode())
    return target


def is_conv3x3_call(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                    feature_group_count=1, batch_group_count=1, **_) -> bool:
    """Whether a `lax.conv_general_dilated` call (as flax's nn.Conv makes it) is the convolution
    every jaxres `conv3x3` computes: NHWC x HWIO, a 3x3 kernel, stride 1, padding 1, no
    dilation or groups (oneDNN's here, Winograd's in `jaxres.winograd`; each adds its dtypes)."""
    specs = (getattr(dimension_numbers, "lhs_spec", None), getattr(dimension_numbers, "rhs_spec", None))
    return (
        not isinstance(padding, str)
        and specs == ((0, 3, 1, 2), (3, 2, 0, 1)) and rhs.shape[:2] == (3, 3)
        and tuple(window_strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1 and batch_group_count == 1
    )  # fmt: skip


class Onednn:
    """oneDNN's 3x3 convolutions in this process, and everything jaxres keeps about them.

    One object holds it all: the library (built, verified and loaded on first use, `load`),
    its answers about this CPU (`unavailable_reason`, `max_channel_product`, `native_bf16`:
    each asked once, then kept), the rules they make (`takes_dtype`, `handles`), the
    convolution (`conv3x3`, and `conv_general_dilated` for flax's nn.Conv) and whether the
    user has been told why "auto" fell back to XLA's convolutions (`told`, set by
    `jaxres.backends.resolve`).

    `default()` is the process's. Code that wants another CPU's answers builds its own, e.g. a
    subclass whose `native_bf16` is a plain class attribute (the tests do), so nothing at
    module level is ever patched. Every instance shares the one dlopen'd library: loading it
    again is cheap, and registering its FFI targets again is harmless (the same addresses).
    """

    def __init__(self) -> None:
        self._library: ctypes.CDLL | None = None
        self.told = False  # whether stderr has been told why oneDNN could not be had (said once)

    def load(self) -> ctypes.CDLL:
        """Build (if needed), verify and load the library, registering its FFI targets with JAX
        (once per object). A cached library that fails to load is rebuilt once, saying so.
        Raises FileNotFoundError (what to install), RuntimeError (the build's errors) or OSError
        (a freshly built library that does not load)."""
        if self._library is None:
            include, lib = locate()
            path = build(include, lib)
            try:
                library = ctypes.cdll.LoadLibrary(str(path))
            except OSError as error:
                print(f"jaxres: the cached oneDNN library {path} does not load ({error}); rebuilding it", file=sys.stderr)
                library = ctypes.cdll.LoadLibrary(str(build(include, lib, rebuild=True)))
            for target in TARGETS.values():
                for name in (target, target + BF16_SUFFIX):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
            library.JaxresOnednnImplementations.restype = ctypes.c_char_p
            library.JaxresOnednnImplementations.argtypes = [ctypes.c_int64] * 6
            self._library = library
        return self._library

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        """None when the oneDNN convolutions can run here, else why not (one line). Loads the
        library (building it if needed) to find out."""
        if platform.system() != "Linux" or platform.machine() != "x86_64":
            return f"the oneDNN wheels are for Linux x86-64, this is {platform.system()} {platform.machine()}"
        try:
            self.load()
        except (OSError, RuntimeError) as error:  # FileNotFoundError is an OSError
            return str(error).splitlines()[0]
        return None

    def implementations(self, batch: int, height: int, width: int, in_channels: int, out_channels: int,
                        dtype=jnp.float32) -> str:
        """oneDNN's names for the kernels it picks for one shape and type (float32 or bfloat16):
        "forward | input grad | weight grad"; for a type it has no kernel for here, "error: ..."."""
        bf16 = int(jnp.dtype(dtype) == jnp.bfloat16)
        return self.load().JaxresOnednnImplementations(batch, height, width, in_channels, out_channels, bf16).decode()

    @functools.cached_property
    def max_channel_product(self) -> int | None:
        """The most in x out channels `handles` gives oneDNN on this CPU, None for no limit: None
        when oneDNN's kernels here are AVX-512 ones (its weight gradient beats XLA's on every
        layer measured, and with no XLA convolution left the epoch scans),
        `AVX2_MAX_CHANNEL_PRODUCT` otherwise. Read off the kernel oneDNN picks for
        `ISA_PROBE_SHAPE`'s weight gradient."""
        weight_gradient = self.implementations(*ISA_PROBE_SHAPE).rsplit("|", 1)[-1]
        return None if "avx512" in weight_gradient else AVX2_MAX_CHANNEL_PRODUCT

    @functools.cached_property
    def native_bf16(self) -> bool:
        """Whether oneDNN's bfloat16 kernels here use the CPU's own bfloat16 instructions (AMX or
        AVX512-BF16) for all three passes of `ISA_PROBE_SHAPE`: only then do bfloat16
        convolutions go to oneDNN (elsewhere oneDNN emulates bfloat16, and XLA's keep them)."""
        names = self.implementations(*ISA_PROBE_SHAPE, dtype=jnp.bfloat16).split("|")
        return len(names) == 3 and all("amx" in name or "avx512_core_bf16" in name for name in names)

    def within_channel_limit(self, in_channels: int, out_channels: int) -> bool:
        """Whether a convolution of in x out channels is within `max_channel_product`."""
        limit = self.max_channel_product
        return limit is None or in_channels * out_channels <= limit

    def takes_dtype(self, dtype) -> bool:
        """float32 always; bfloat16 where `native_bf16`."""
        dtype = jnp.dtype(dtype)
        return dtype == jnp.float32 or (dtype == jnp.bfloat16 and self.native_bf16)

    def handles(self, lhs, rhs, window_strides, padding, *args, **kwargs) -> bool:
        """Whether `conv3x3` computes this `lax.conv_general_dilated` call (as flax's nn.Conv makes
        it): a `is_conv3x3_call` in a dtype and of channels this CPU's oneDNN takes."""
        return (
            is_conv3x3_call(lhs, rhs, window_strides, padding, *args, **kwargs)
            and lhs.dtype == rhs.dtype and self.takes_dtype(lhs.dtype)
            and self.within_channel_limit(rhs.shape[2], rhs.shape[3])
        )

    def conv_general_dilated(self, lhs, rhs, window_strides, padding, *args, **kwargs):
        """`jax.lax.conv_general_dilated` with the convolutions `handles` says yes to done by
        `conv3x3`: what flax's `nn.Conv(conv_general_dilated=...)` takes."""
        if self.handles(lhs, rhs, window_strides, padding, *args, **kwargs):
            return self.conv3x3(lhs, rhs)
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)

    def _call(self, target: str, shape: tuple, *operands):
        dtypes = {jnp.dtype(operand.dtype) for operand in operands}
        if len(dtypes) != 1 or not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
            raise TypeError(f"jaxres oneDNN {target}: operands must all be float32 or all bfloat16, got "
                            f"{', '.join(str(operand.dtype) for operand in operands)}")
        self.load()  # the FFI targets are registered before the call is traced
        (dtype,) = dtypes
        name = TARGETS[target] + (BF16_SUFFIX if dtype == jnp.bfloat16 else "")
        return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")(*operands)

    def forward(self, x, w):
        """oneDNN's forward pass: x[N,H,W,Ci], w[3,3,Ci,Co] -> y[N,H,W,Co] (float32 or bfloat16, both alike)."""
        return self._call("forward", x.shape[:3] + (w.shape[3],), x, w)

    def input_gradient(self, g, w):
        """oneDNN's gradient of the input: g[N,H,W,Co], w[3,3,Ci,Co] -> dx[N,H,W,Ci]."""
        return self._call("backward_data", g.shape[:3] + (w.shape[2],), g, w)

    def weight_gradient(self, x, g):
        """oneDNN's gradient of the weights: x[N,H,W,Ci], g[N,H,W,Co] -> dw[3,3,Ci,Co]."""
        return self._call("backward_weights", (3, 3, x.shape[3], g.shape[3]), x, g)

    @functools.cached_property
    def conv3x3(self) -> Callable:
        """The function float32 or bfloat16 x[N,H,W,Ci] (*) w[3,3,Ci,Co], stride 1, padding 1 ->
        [N,H,W,Co], by oneDNN, differentiable in reverse mode to any order (one per object, so
        every call traces the same one).

        The three passes F(x, w) = y, I(g, w) = dx, W(x, g) = dw are each a `jax.custom_vjp`
        whose backward pass is the other two: all three are bilinear, and I(., w) and W(x, .)
        are the adjoints of F(., w) and F(x, .), so <c, F(x, w)> has gradients (I(c, w),
        W(x, c)), <c, I(g, w)> = <F(c, w), g> has (F(c, w), W(c, g)), and <c, W(x, g)> =
        <F(x, c), g> has (I(g, c), F(x, c)). A gradient of a gradient (a Hessian-vector
        product, a CAM inside a loss) is then oneDNN's too: each forward rule calls its own
        custom_vjp (not the FFI call), so that an outer differentiation of it takes the rule
        again. Forward mode (jax.jvp) it has not: JAX has none for a custom_vjp."""
        forward, input_gradient, weight_gradient = (
            jax.custom_vjp(function) for function in (self.forward, self.input_gradient, self.weight_gradient)
        )
        forward.defvjp(
            lambda x, w: (forward(x, w), (x, w)),
            lambda residuals, c: (input_gradient(c, residuals[1]), weight_gradient(residuals[0], c)),
        )
        input_gradient.defvjp(
            lambda g, w: (input_gradient(g, w), (g, w)),
            lambda residuals, c: (forward(c, residuals[1]), weight_gradient(c, residuals[0])),
        )
        weight_gradient.defvjp(
            lambda x, g: (weight_gradient(x, g), (x, g)),
            lambda residuals, c: (input_gradient(residuals[1], c), forward(residuals[0], c)),
        )
        return forward


@functools.cache  # the documented cache: one library load and one set of probes per process
def default() -> Onednn:
    """The process's `Onednn`: what `jaxres.backends.resolve` uses unless it is given another."""
    return Onednn()
