"""benchmarks/onednn_conv.py, the oneDNN-through-FFI convolution prototype: it computes the
convolution and both of its gradients, and it says what is missing when it cannot build.

The bound: a sum of K float32 products, taken in any order (blocked, with or without FMA),
is within gamma_K * sum|products| of the exact sum, gamma_K = K*u / (1 - K*u) with
u = 2**-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Both oneDNN's
direct convolution and XLA's are such sums, so each output is checked against a float64
NumPy reference with that bound, computed per output element from |x| and |w|. A wrong
tap, padding, flip or layout is off by the size of a whole product, far above it.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from benchmarks import onednn_conv

U = 2.0**-24


def library_or_skip():
    try:
        return onednn_conv.load()
    except FileNotFoundError as missing:  # wheels or compiler absent: say which
        pytest.skip(str(missing))


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


def test_forward_and_both_gradients_are_within_the_float32_summation_bound():
    library_or_skip()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    n, h, width, ci, co = 4, 8, 8, 5, 7
    x = rng.standard_normal((n, h, width, ci)).astype(np.float32)
    w = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
    g = rng.standard_normal((n, h, width, co)).astype(np.float32)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))

    y, vjp = jax.vjp(onednn_conv.conv3x3, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))

    # forward: 9*ci products per output
    exact, forward_scale = conv_reference(x64, w64), conv_reference(np.abs(x64), np.abs(w64))
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= gamma(9 * ci) * forward_scale)
    # input gradient: the transposed convolution (w flipped, in/out swapped), 9*co products
    flipped = w64[::-1, ::-1].transpose(0, 1, 3, 2)
    exact, scale = conv_reference(g64, flipped), conv_reference(np.abs(g64), np.abs(flipped))
    assert np.all(np.abs(np.asarray(dx, np.float64) - exact) <= gamma(9 * co) * scale)
    # weight gradient: dw[i,j,c,o] = sum over n,h,w of x_pad[n,h+i,w+j,c] g[n,h,w,o], n*h*w products
    padded = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = [[padded[:, i : i + h, j : j + width, :] for j in range(3)] for i in range(3)]
    exact = np.array([[np.einsum("nhwc,nhwo->co", windows[i][j], g64) for j in range(3)] for i in range(3)])
    scale = np.array([[np.einsum("nhwc,nhwo->co", np.abs(windows[i][j]), np.abs(g64)) for j in range(3)] for i in range(3)])
    assert np.all(np.abs(np.asarray(dw, np.float64) - exact) <= gamma(n * h * width) * scale)
    # and a shifted tap is far outside the bound: the check can fail
    wrong = conv_reference(x64, np.roll(w64, 1, axis=0))
    assert not np.all(np.abs(np.asarray(y, np.float64) - wrong) <= gamma(9 * ci) * forward_scale)


def test_the_model_calls_onednn_inside_the_context_and_xla_outside():
    library_or_skip()
    import jax

    from jaxres import models
    from jaxres.config import TrainConfig

    config = TrainConfig(width=0.0625)
    images = np.zeros((2, 32, 32, 3), np.float32)

    def hlo(model):
        variables = models.init_variables(model, jax.random.PRNGKey(0))
        return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).as_text()

    with onednn_conv.onednn_convolutions():
        inside = hlo(models.from_config(config, num_classes=10))
    outside = hlo(models.from_config(config, num_classes=10))
    assert inside.count(onednn_conv.TARGETS["forward"]) == 8  # the eight 3x3 convolutions of ResNet-9
    assert onednn_conv.TARGETS["forward"] not in outside and "convolution" in outside


def test_a_missing_install_names_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onednn_conv.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install onednn-cpu-gomp onednn-devel-cpu-gomp"):
        onednn_conv.locate()
