"""jaxres/onednn.py, oneDNN's convolutions through JAX's FFI (conv_backend "onednn", the CPU
default): it computes the convolution and both of its gradients, the model calls it where it
should, and "auto" / "onednn" (`jaxres.backends.resolve`) say what is missing when it cannot
be had. Tests that need another CPU's answers build their own `onednn.Onednn` (`answering`,
`kernel_names`) and pass it in; nothing module-level is patched.

The bound: a sum of K float32 products, taken in any order (blocked, with or without FMA),
is within gamma_K * sum|products| of the exact sum, gamma_K = K*u / (1 - K*u) with
u = 2**-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Both oneDNN's
direct convolution and XLA's are such sums, so each output is checked against a float64
NumPy reference with that bound, computed per output element from |x| and |w|. A wrong
tap, padding, flip or layout is off by the size of a whole product, far above it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxres import backends, onednn
from jaxres.errors import JaxresError

REPO = Path(__file__).resolve().parents[1]

U = 2.0**-24


def library_or_skip() -> onednn.Onednn:
    """The process's `Onednn`, its library loaded (the test is skipped when it cannot be had)."""
    library = onednn.default()
    try:
        library.load()
    except FileNotFoundError as missing:  # wheels or compiler absent: say which
        pytest.skip(str(missing))
    return library


def answering(**answers) -> onednn.Onednn:
    """A fresh `Onednn` (the real library) whose probes give `answers` instead of asking this
    CPU, e.g. `native_bf16=False`: what another CPU would answer."""
    return type("Answering", (onednn.Onednn,), answers)()


def kernel_names(names: str) -> onednn.Onednn:
    """A fresh `Onednn` to which oneDNN names `names` for every kernel it is asked about."""

    class Named(onednn.Onednn):
        def implementations(self, *shape, dtype=None):
            return names

    return Named()


def conv_reference(x, w):
    """float64 3x3, stride 1, padding 1 convolution, NHWC x HWIO, by explicit patches."""
    n, h, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, width, w.shape[3]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", padded[:, i : i + h, j : j + width, :], w[i, j])
    return out


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def references(x, w, g):
    """(exact, scale, K) in float64 for y = conv(x, w) and, with output gradient g, dx and dw:
    each result element is a sum of K products, scale the same sum of their absolute values."""
    n, h, width, ci = x.shape
    co = w.shape[3]
    # input gradient: the transposed convolution (w flipped, in/out swapped), 9*co products
    flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)
    # weight gradient: dw[i,j,c,o] = sum over n,h,w of x_pad[n,h+i,w+j,c] g[n,h,w,o], n*h*w products
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = [[padded[:, i : i + h, j : j + width, :] for j in range(3)] for i in range(3)]
    taps = lambda a, b: np.array([[np.einsum("nhwc,nhwo->co", a[i][j], b) for j in range(3)] for i in range(3)])  # noqa: E731
    absolute = [[np.abs(window) for window in row] for row in windows]
    return (
        (conv_reference(x, w), conv_reference(np.abs(x), np.abs(w)), 9 * ci),  # forward: 9*ci products
        (conv_reference(g, flipped), conv_reference(np.abs(g), np.abs(flipped)), 9 * co),
        (taps(windows, g), taps(absolute, np.abs(g)), n * h * width),
    )


@pytest.mark.parametrize("size", [4, 16])
def test_forward_and_both_gradients_are_within_the_float32_summation_bound(size):
    library = library_or_skip()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    n, h, width, ci, co = 4, size, size, 5, 7
    x = rng.standard_normal((n, h, width, ci)).astype(np.float32)
    w = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
    g = rng.standard_normal((n, h, width, co)).astype(np.float32)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))

    y, vjp = jax.vjp(library.conv3x3, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))

    checks = references(x64, w64, g64)
    for result, (exact, scale, k) in zip((y, dx, dw), checks):
        assert np.all(np.abs(np.asarray(result, np.float64) - exact) <= gamma(k) * scale)
    forward_scale = checks[0][1]
    # and a shifted tap is far outside the bound: the check can fail
    wrong = conv_reference(x64, np.roll(w64, 1, axis=0))
    assert not np.all(np.abs(np.asarray(y, np.float64) - wrong) <= gamma(9 * ci) * forward_scale)


@pytest.mark.parametrize("size", [4, 8])
def test_gradients_of_gradients_are_onednns_and_follow_the_bilinear_identities(size):
    """Reverse over reverse: the gradient of <c1, dx> + <c2, dw>, (dx, dw) the convolution's
    VJP of g, is (I(g, c2), W(c1, g), F(c1, w) + F(x, c2)) with F, I, W the forward, input-
    and weight-gradient passes; each within the float32 summation bound of its float64 value,
    and no XLA convolution anywhere in the program (a gradient of a gradient, e.g.
    shapleycam's Hessian-vector product, stays oneDNN's)."""
    library = library_or_skip()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    n, h, width, ci, co = 2, size, size, 5, 7
    x, c1 = (rng.standard_normal((n, h, width, ci)).astype(np.float32) for _ in range(2))
    w, c2 = (rng.standard_normal((3, 3, ci, co)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((n, h, width, co)).astype(np.float32)

    def loss(x, w, g):
        _, vjp = jax.vjp(library.conv3x3, x, w)
        dx, dw = vjp(g)
        return jnp.sum(c1 * dx) + jnp.sum(c2 * dw)

    program = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w, g)
    assert "conv_general_dilated" not in str(program)
    gx, gw, gg = (np.asarray(a, np.float64) for a in jax.grad(loss, argnums=(0, 1, 2))(x, w, g))
    x64, w64, g64, c164, c264 = (a.astype(np.float64) for a in (x, w, g, c1, c2))
    (_, (input_of_g, input_scale, k_input), _) = references(x64, c264, g64)  # I(g, c2)
    (forward_c1, forward_c1_scale, k_forward), _, (weight_of_c1, weight_scale, k_weight) = references(c164, w64, g64)
    (forward_c2, forward_c2_scale, k_forward2), _, _ = references(x64, c264, g64)
    assert np.all(np.abs(gx - input_of_g) <= gamma(k_input) * input_scale)
    assert np.all(np.abs(gw - weight_of_c1) <= gamma(k_weight) * weight_scale)
    exact = forward_c1 + forward_c2
    bound = gamma(k_forward) * forward_c1_scale + gamma(k_forward2) * forward_c2_scale + U * (np.abs(exact) + 1e-30)
    assert np.all(np.abs(gg - exact) <= 2 * bound)  # two sums, then their sum rounded once
    # and the identities can fail: the other pairing is far outside
    assert not np.all(np.abs(gg - (forward_c1 - forward_c2)) <= 2 * bound)


def test_shapleycam_and_a_gradient_through_a_cam_run_on_a_onednn_model_as_on_xla():
    """python -m jaxres.gradcam loads its model with the run's conv backend (oneDNN's on a CPU):
    shapleycam below the last stage (a Hessian-vector product through convolutions) and a
    gradient of a map with respect to the images run there, equal to XLA's model's."""
    library = library_or_skip()
    import jax
    import jax.numpy as jnp

    from jaxres import backends, models
    from jaxres.gradcam import gradcam
    from tests.helpers import random_variables

    xla_model = models.create_model("custom_resnet", width=0.125)
    onednn_model = models.create_model("custom_resnet", width=0.125, conv=backends.ConvBackend("onednn", library.conv_general_dilated).conv)
    variables = random_variables(xla_model, seed=4)
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    for method in ("shapleycam", "gradcam"):
        maps = [np.asarray(gradcam(m, variables, images, [1, 2, 3], "layer2", method)) for m in (xla_model, onednn_model)]
        # normalised maps from float32 sums in two orders: a few float32 roundings of their range 1
        np.testing.assert_allclose(maps[1], maps[0], rtol=0, atol=1e-4)
    grads = [
        np.asarray(jax.grad(lambda x, m=m: jnp.sum(gradcam(m, variables, x, [1, 2, 3], "layer2", upsample=False) ** 2))(jnp.asarray(images)))
        for m in (xla_model, onednn_model)
    ]  # fmt: skip
    assert np.abs(grads[0]).max() > 0
    np.testing.assert_allclose(grads[1], grads[0], rtol=0, atol=1e-4 * np.abs(grads[0]).max())


@pytest.mark.parametrize("size", [4, 16])
def test_bfloat16_forward_and_both_gradients_are_float32_sums_rounded_once_to_bfloat16(size):
    """The bfloat16 handlers (used where `native_bf16`): bfloat16 operands, products exact in
    float32, float32 sums (the bound above), one rounding to bfloat16 at the end (unit
    roundoff 2**-8). bfloat16 sums would be ~2**-8 * K off, far outside."""
    library = library_or_skip()
    if not library.native_bf16:
        pytest.skip("oneDNN's bfloat16 kernels on this CPU do not use native bfloat16 (no AMX or AVX512-BF16): "
                    "jaxres leaves bfloat16 convolutions to XLA here")
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    n, h, width, ci, co = 4, size, size, 24, 20
    # operands exactly representable in bfloat16, so only the sums and the last rounding differ
    x, w, g = (np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16), np.float64)
               for shape in ((n, h, width, ci), (3, 3, ci, co), (n, h, width, co)))
    y, vjp = jax.vjp(library.conv3x3, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16

    def within(result, exact, scale, k):
        sum_error = gamma(k) * scale
        return np.all(np.abs(np.asarray(result, np.float64) - exact) <= sum_error + 2.0**-8 * (np.abs(exact) + sum_error))

    for result, (exact, scale, k) in zip((y, dx, dw), references(x, w, g)):
        assert within(result, exact, scale, k)
    # a shifted tap is far outside the bound: the check can fail
    assert not within(y, conv_reference(x, np.roll(w, 1, axis=0)), conv_reference(np.abs(x), np.abs(w)), 9 * ci)


def test_the_model_calls_onednn_for_its_3x3_float32_convolutions_with_conv_backend_onednn():
    library_or_skip()
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxres import models
    from jaxres.config import TrainConfig

    config = TrainConfig(width=0.0625)
    images = np.zeros((2, 32, 32, 3), np.float32)

    def hlo(config, library=None):
        model = backends.model_from_config(config, 10, backends.resolve(config.conv_backend, library))
        # shapes only: lowering runs no convolution (a bfloat16 one through oneDNN could not run
        # on a CPU without bfloat16 kernels, such as an AVX2 one)
        variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))
        loss = lambda v, x: jnp.sum(model.apply(v, x, train=False))  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(variables, images).as_text()

    text = hlo(dataclasses.replace(config, conv_backend="onednn"))
    assert text.count(onednn.TARGETS["forward"]) == 8  # the eight 3x3 convolutions of ResNet-9
    assert text.count(onednn.TARGETS["backward_data"]) == 7  # none for the images (not differentiated)
    assert text.count(onednn.TARGETS["backward_weights"]) == 8  # at every size, 4x4 included
    xla = hlo(dataclasses.replace(config, conv_backend="xla"))
    assert "JaxresOnednn" not in xla and "convolution" in xla
    # bfloat16 only where oneDNN has native bfloat16 kernels (AMX, AVX512-BF16), else XLA's
    bf16 = hlo(dataclasses.replace(config, conv_backend="onednn", precision="bf16"), answering(native_bf16=False))
    assert "JaxresOnednn" not in bf16
    # tracing only: no oneDNN kernel runs
    bf16 = hlo(dataclasses.replace(config, conv_backend="onednn", precision="bf16"), answering(native_bf16=True))
    assert bf16.count(onednn.TARGETS["forward"] + onednn.BF16_SUFFIX) == 8
    assert bf16.count(onednn.TARGETS["backward_weights"] + onednn.BF16_SUFFIX) == 8
    fp16 = hlo(dataclasses.replace(config, conv_backend="onednn", precision="fp16"))
    assert "JaxresOnednn" not in fp16  # float32 and bfloat16 only
    # at width 1, where oneDNN's kernels are AVX2 ones, only the convolutions of at most 128 x 128
    # channels (prep, layer1's three); with its AVX-512 kernels every one
    for limit, expected in ((onednn.AVX2_MAX_CHANNEL_PRODUCT, 4), (None, 8)):
        wide = hlo(dataclasses.replace(config, width=1.0, conv_backend="onednn"), answering(max_channel_product=limit))
        assert wide.count(onednn.TARGETS["forward"]) == expected


def test_the_channel_limit_follows_the_isa_of_onednns_weight_gradient_kernel():
    """oneDNN's kernel names carry the ISA (jit:avx2, jit:avx512_core, ...): AVX-512 -> no
    limit, anything else -> the AVX2 limit; and this CPU's real names do carry one."""
    library = library_or_skip()
    real = library.implementations(*onednn.ISA_PROBE_SHAPE)
    assert real.count("|") == 2 and ("avx2" in real or "avx512" in real), real
    # against the kernel's own word for the CPU: AVX-512 kernels where /proc/cpuinfo lists avx512f
    flags = Path("/proc/cpuinfo").read_text().split()
    assert (library.max_channel_product is None) == ("avx512f" in flags), (real, "avx512f" in flags)
    for names, limit in (("brgconv:avx2 | brg_fwd:avx2+brgconv:avx2 | jit:avx2", onednn.AVX2_MAX_CHANNEL_PRODUCT),
                         ("brgconv:avx512_core | brgconv:avx512_core | jit:avx512_core", None),
                         ("brgconv:avx512_core | brgconv:avx512_core | jit:avx2", onednn.AVX2_MAX_CHANNEL_PRODUCT),
                         ("brgconv:avx512_core_amx | x | jit:avx512_core_amx", None)):
        assert kernel_names(names).max_channel_product == limit, names


def test_auto_runs_the_cpu_epoch_as_one_scan_when_onednn_computes_every_convolution():
    """`loops.choose_loop` traces the model: scan with oneDNN's convolutions only, the
    host loop while an XLA convolution is left (bf16 without native bfloat16 kernels, or XLA's
    backend), for training and evaluation alike; the scanned epoch computes what the stepped
    one does."""
    library = library_or_skip()
    import dataclasses

    import jax

    from jaxres import evaluate, loops, optim, parallel, train
    from tests.helpers import random_dataset, random_variables, tiny_config

    dataset = random_dataset()
    mesh = parallel.make_mesh()
    put = lambda x: parallel.replicate(mesh, x)  # noqa: E731
    images, labels = put(dataset.train.images), put(dataset.train.labels)

    def epoch(library=None, **changes):
        config = dataclasses.replace(tiny_config("unused", epochs=1), **changes)
        model = backends.model_from_config(config, 4, backends.resolve(config.conv_backend, library))
        optimizer, _ = optim.make_optimizer(config, steps_per_epoch=2)
        variables = random_variables(model, 0)
        state = parallel.replicate_tree(mesh, train.init_train_state(config, optimizer, variables))
        train_epoch = train.make_train_epoch(model, optimizer, config, mesh, 2)
        evaluation = evaluate.make_evaluate(model, config, mesh)
        assert train_epoch.loop == evaluation.loop == loops.choose_loop(config.epoch_loop, model)  # decided when built
        state, metrics = jax.device_get(train_epoch(state, images, labels, jax.random.PRNGKey(1)))
        evaluation(variables, images, labels)
        return train_epoch.loop, evaluation.loop, state, metrics

    scan_loop, scan_eval_loop, scanned, scanned_metrics = epoch(conv_backend="onednn")
    assert (scan_loop, scan_eval_loop) == ("scan", "scan")
    assert epoch(conv_backend="xla")[:2] == ("steps", "steps")
    # bfloat16 left to XLA (a CPU without native bfloat16): XLA's bf16 convolutions
    assert epoch(answering(native_bf16=False), conv_backend="onednn", precision="bf16")[:2] == ("steps", "steps")
    if library.native_bf16:  # oneDNN's bfloat16 kernels: nothing of XLA's left, one scan again
        assert epoch(conv_backend="onednn", precision="bf16")[:2] == ("scan", "scan")
    steps_loop, _, stepped, stepped_metrics = epoch(conv_backend="onednn", epoch_loop="steps")
    assert steps_loop == "steps"
    # the same two steps; XLA fuses the scan's body differently, so float32 rounding apart
    assert float(scanned_metrics["loss"]) == pytest.approx(float(stepped_metrics["loss"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(scanned.params), jax.tree_util.tree_leaves(stepped.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * float(np.max(np.abs(b))) + 1e-7)


@pytest.mark.parametrize("names, native", [
    ("brgconv:avx512_core_amx | brg_fwd:avx512_core_amx+brgconv:avx512_core_amx | brgconv_bwd_w:avx512_core_amx", True),
    ("jit:avx512_core_bf16 | jit:avx512_core_bf16 | jit:avx512_core_bf16", True),  # AVX512-BF16, no AMX
    ("jit:avx512_core | jit:avx512_core | jit:avx512_core", False),  # bfloat16 emulated
    ("brgconv:avx512_core_amx | brgconv:avx512_core_amx | gemm:jit:bf16", False),  # one pass not native
    ("error: could not create a primitive descriptor for a convolution forward propagation primitive", False),
])
def test_bf16_goes_to_onednn_only_where_all_three_of_its_bfloat16_kernels_are_native(names, native):
    assert kernel_names(names).native_bf16 is native


def test_the_bf16_probe_answers_with_names_or_an_error_string_on_this_cpu():
    """On a CPU where oneDNN has no bfloat16 convolution the probe must say so, not raise."""
    library = library_or_skip()
    import jax.numpy as jnp

    names = library.implementations(*onednn.ISA_PROBE_SHAPE, dtype=jnp.bfloat16)
    assert names.count("|") == 2 or names.startswith("error: "), names
    flags = Path("/proc/cpuinfo").read_text().split()
    if "amx_bf16" in flags:  # the Xeon with AMX: oneDNN's own AMX kernels
        assert library.native_bf16 and "amx" in names, names


def test_the_handlers_refuse_mixed_or_other_dtypes_when_traced():
    library = library_or_skip()
    import jax.numpy as jnp

    x, w = jnp.zeros((1, 4, 4, 2), jnp.float32), jnp.zeros((3, 3, 2, 2), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        library.forward(x, w)
    with pytest.raises(TypeError, match="float16, float16"):
        library.forward(x.astype(jnp.float16), w.astype(jnp.float16))


def test_resolve_says_why_auto_falls_back_and_onednn_fails(capsys):
    library = answering(unavailable_reason="no C++ compiler (g++ or c++) on PATH")
    assert backends.resolve("xla", library).name == "xla"
    assert backends.resolve("auto", library).name == "xla"
    assert backends.resolve("auto", library) is backends.XLA
    assert capsys.readouterr().err.count("XLA's convolutions, not oneDNN's: no C++ compiler") == 1  # once
    assert library.told
    with pytest.raises(JaxresError, match="conv_backend onednn is not available: no C\\+\\+ compiler"):
        backends.resolve("onednn", library)
    with pytest.raises(JaxresError, match="unknown conv_backend 'eigen'"):
        backends.resolve("eigen", library)


def test_auto_is_xla_on_a_gpu_without_a_word_and_onednn_is_refused(monkeypatch, capsys):
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    library = answering(unavailable_reason="never asked on a GPU")
    assert backends.resolve("auto", library).name == "xla"
    assert capsys.readouterr().err == "" and not library.told
    with pytest.raises(JaxresError, match="conv_backend onednn is for the CPU, JAX runs on gpu"):
        backends.resolve("onednn", library)


def test_auto_is_xla_with_several_devices_and_onednn_is_refused():
    script = (
        "import json; from jaxres import backends; from jaxres.errors import JaxresError\n"
        "try:\n    backends.resolve('onednn'); error = None\n"
        "except JaxresError as e:\n    error = str(e)\n"
        "print(json.dumps({'auto': backends.resolve('auto').name, 'error': error}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["auto"] == "xla"
    assert "needs a single device, JAX has 2" in report["error"]


def test_a_missing_install_names_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onednn.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install onednn-cpu-gomp onednn-devel-cpu-gomp"):
        onednn.locate()


# --------------------------------------------------------------------------- the cached library (issue 25, item 2)

FAKE_COMPILER = """#!/bin/sh
# stands in for g++: copies a library built before to the -o path, or writes {garbage_once} first
while [ $# -gt 1 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
echo build >> {log}
if [ -n "{garbage_once}" ] && [ ! -e "{garbage_once}" ]; then : > "{garbage_once}"; echo not a library > "$out"
else cp {real} "$out"; fi
"""


def fake_compiler(tmp_path, garbage_once: str = "") -> tuple[Path, Path]:
    """(a compiler script that copies the real library, its log of builds): a rebuild in a
    test costs a copy, not a compilation."""
    real = onednn.build(*onednn.locate())  # the real one, compiled once in $JAXRES_CACHE
    script, log = tmp_path / "fake-g++", tmp_path / "builds.log"
    script.write_text(FAKE_COMPILER.format(log=log, real=real, garbage_once=garbage_once))
    script.chmod(0o755)
    return script, log


LOAD_AND_PROBE = (
    "from jaxres import onednn\n"
    "library = onednn.default()\n"
    "assert library.unavailable_reason is None, library.unavailable_reason\n"
    "print(library.implementations(1, 4, 4, 8, 8))\n"
)


def load_in_child(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_AND_PROBE], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "no digest"])
def test_a_damaged_cached_library_is_rebuilt_saying_so_once_never_loaded(tmp_path, monkeypatch, damage):
    library_or_skip()
    compiler, log = fake_compiler(tmp_path)
    env = {**os.environ, "JAXRES_CACHE": str(tmp_path / "cache"), "CXX": str(compiler)}
    monkeypatch.setenv("JAXRES_CACHE", env["JAXRES_CACHE"])
    monkeypatch.setenv("CXX", env["CXX"])
    target = onednn.build(*onednn.locate())
    digest_file = target.with_name(target.name + onednn.DIGEST_SUFFIX)
    assert digest_file.read_text().strip() == onednn._file_digest(target)  # written beside it at build time
    assert sorted(path.name for path in target.parent.iterdir()) == [".build.lock", target.name, digest_file.name]
    size = target.stat().st_size
    if damage == "truncated":  # dlopen of this gave SIGBUS: exit 135, nothing said
        os.truncate(target, 4096)
    elif damage == "empty":
        os.truncate(target, 0)
    elif damage == "garbage":
        target.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        digest_file.unlink()
    done = load_in_child(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("jaxres: the cached oneDNN library") == 1 and "rebuilding it" in done.stderr, done.stderr
    assert log.read_text().count("build") == 2  # the first build, and the one rebuild
    assert onednn.damage(target) is None and target.stat().st_size == size
    again = load_in_child(env)  # the rebuilt library is used as it is, without a word
    assert again.returncode == 0 and "jaxres:" not in again.stderr and log.read_text().count("build") == 2


def test_a_cached_library_that_does_not_load_is_rebuilt_once(tmp_path):
    library_or_skip()
    compiler, log = fake_compiler(tmp_path, garbage_once=str(tmp_path / "garbage-written"))
    env = {**os.environ, "JAXRES_CACHE": str(tmp_path / "cache"), "CXX": str(compiler)}
    done = load_in_child(env)  # builds "not a library" (its digest right), which dlopen refuses
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("does not load") == 1 and "rebuilding it" in done.stderr, done.stderr
    assert log.read_text().count("build") == 2
