"""jaxres/winograd.py, Winograd's F(4x4, 3x3) (conv_algorithm "winograd"): the convolution and
both gradients against float64 NumPy references, which convolutions it takes, and a model
built with it.

The bound. Each Winograd output is a sum of products of terms (transform coefficients,
inputs, weights); in float32 every such term is perturbed by at most k roundings, k the
longest chain of operations that builds it (two transform stages of the input, the
filter's transform with its inexact 1/6 and 1/24, the product, the sum over channels or
tiles, two stages of the output transform), so the result is within gamma_k times the sum
of the terms' absolute values of the exact value (Higham, 3.1 and 3.3). That sum is the
same algorithm run in float64 with every matrix and operand replaced by its absolute
value (`absolute_winograd`). A wrong tap, flip or transform is off by whole products, far
above it (checked below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import backends, config as config_lib, loops, models, winograd
from jaxres.errors import JaxresError
from tests.test_onednn import conv_reference, gamma, references

BT, G, AT = winograd.INPUT_TRANSFORM, winograd.FILTER_TRANSFORM, winograd.OUTPUT_TRANSFORM
# longest rounding chains (see the module docstring): input transform 2 x 4, filter
# transform 9 terms of 3 factors plus the coefficients' own rounding, output transform 2 x 6
FORWARD_CHAIN = 8 + 14 + 12 + 1
# kernel gradient: the input's and the output gradient's transforms (2 x 4 each), the
# product, then G^T . G over 36 terms of 3 factors with the coefficients' rounding
KERNEL_GRADIENT_CHAIN = 8 + 8 + 1 + 40


def tiles64(x, matrix, pad_before: int):
    """The 2-D transform `matrix` . tile . matrix^T of every tile of x[N, H, W, C] (tiles of
    side matrix.shape[1], one every 4 pixels, x padded by `pad_before` and up to a multiple of
    4): float64[36, N * tiles, C], NumPy."""
    n, h, w, c = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    side = matrix.shape[1]
    padded = np.zeros((n, 4 * th + side - 4, 4 * tw + side - 4, c))
    padded[:, pad_before : pad_before + h, pad_before : pad_before + w] = x
    tiles = np.stack(
        [[padded[:, a : a + 4 * th : 4, b : b + 4 * tw : 4] for b in range(side)] for a in range(side)]
    )  # [a, b, n, th, tw, c]
    return np.einsum("pa,abnijc,qb->pqnijc", matrix, tiles, matrix).reshape(matrix.shape[0] ** 2, -1, c)


def winograd64(x, w, bt=BT, g=G, at=AT):
    """Winograd F(4x4, 3x3) in float64 NumPy with the given matrices: the exact convolution for
    the true ones, the sum of the terms' absolute values for their absolute values."""
    n, h, width, _ = x.shape
    th, tw = -(-h // 4), -(-width // 4)
    products = np.einsum("ptc,pco->pto", tiles64(x, bt, 1), np.einsum("pa,abco,qb->pqco", g, w, g).reshape(36, *w.shape[2:]))
    blocks = np.einsum("rp,pqto,sq->rsto", at, products.reshape(6, 6, -1, w.shape[3]), at)
    blocks = blocks.reshape(4, 4, n, th, tw, -1).transpose(2, 3, 0, 4, 1, 5).reshape(n, 4 * th, 4 * tw, -1)
    return blocks[:, :h, :width]


def absolute_winograd(x, w):
    return winograd64(np.abs(x), np.abs(w), np.abs(BT), np.abs(G), np.abs(AT))


def absolute_kernel_gradient(x, g):
    """The kernel gradient's sum of absolute terms: |G|^T [sum over tiles |V| * |A g A^T|] |G|."""
    products = np.einsum("ptc,pto->pco", tiles64(np.abs(x), np.abs(BT), 1), tiles64(np.abs(g), np.abs(AT.T), 0))
    return np.einsum("pa,pqco,qb->abco", np.abs(G), products.reshape(6, 6, *products.shape[1:]), np.abs(G))


def test_the_float64_transforms_compute_the_convolution():
    """The matrices themselves: in float64 the algorithm is the convolution to rounding."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 9, 6, 3)), rng.standard_normal((3, 3, 3, 4))
    np.testing.assert_allclose(winograd64(x, w), conv_reference(x, w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (4, 4), (7, 7), (8, 13), (15, 15)])
def test_forward_and_both_gradients_are_within_the_float32_bound(size):
    rng = np.random.default_rng(0)
    n, (h, width), ci, co = 3, size, 5, 7
    x = rng.standard_normal((n, h, width, ci)).astype(np.float32)
    w = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
    g = rng.standard_normal((n, h, width, co)).astype(np.float32)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))

    y, vjp = jax.vjp(winograd.conv3x3, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))

    (exact_y, _, _), (exact_dx, _, _), (exact_dw, _, _) = references(x64, w64, g64)
    flipped = w64[::-1, ::-1].transpose(0, 1, 3, 2)
    tiles = n * -(-h // 4) * -(-width // 4)
    checks = (
        (y, exact_y, absolute_winograd(x64, w64), FORWARD_CHAIN + ci),
        (dx, exact_dx, absolute_winograd(g64, flipped), FORWARD_CHAIN + co),  # the input gradient is conv3x3 again
        (dw, exact_dw, absolute_kernel_gradient(x64, g64), KERNEL_GRADIENT_CHAIN + tiles),
    )
    for result, exact, scale, k in checks:
        assert np.all(np.abs(np.asarray(result, np.float64) - exact) <= gamma(k) * scale)
    # a shifted tap is far outside the bound: the check can fail
    wrong = conv_reference(x64, np.roll(w64, 1, axis=0))
    assert not np.all(np.abs(np.asarray(y, np.float64) - wrong) <= gamma(FORWARD_CHAIN + ci) * checks[0][2])


def test_it_takes_the_float32_3x3_stride_1_convolutions_and_leaves_the_rest():
    calls = []

    def fallback(lhs, rhs, window_strides, padding, *args, **kwargs):
        calls.append((rhs.shape[:2], tuple(window_strides), jnp.dtype(lhs.dtype).name))
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)

    conv = backends.conv_factory(winograd.conv_general_dilated_with(fallback))
    x = jnp.ones((2, 8, 8, 3))
    for module, inputs in (
        (conv(4, (3, 3), padding=1), x),  # Winograd's (the models' convolutions)
        (conv(4, (3, 3), strides=2, padding=1), x),
        (conv(4, (1, 1)), x),
        (conv(4, (3, 3), padding="VALID"), x),
        (conv(4, (3, 3), padding=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), x.astype(jnp.bfloat16)),
    ):
        module.init(jax.random.PRNGKey(0), inputs)
    assert calls == [((3, 3), (2, 2), "float32"), ((1, 1), (1, 1), "float32"), ((3, 3), (1, 1), "float32"),
                     ((3, 3), (1, 1), "bfloat16")]  # fmt: skip
    # the same fallback gives the same function: models built alike compare equal
    assert winograd.conv_general_dilated_with(fallback) is winograd.conv_general_dilated_with(fallback)


def test_the_config_names_the_algorithm_and_refuses_an_unknown_one():
    assert backends.with_algorithm(backends.XLA, "direct") is backends.XLA
    assert backends.with_algorithm(backends.XLA, "winograd").name == "xla+winograd"
    assert backends.with_algorithm(backends.XLA, "auto", platform="cpu").name == "xla+winograd"
    assert backends.with_algorithm(backends.XLA, "auto", platform="gpu") is backends.XLA
    config = config_lib.TrainConfig(conv_backend="xla", conv_algorithm="winograd")
    assert backends.for_config(config).name == "xla+winograd"
    with pytest.raises(JaxresError, match="conv_algorithm 'fft'"):
        config_lib.validate(config_lib.TrainConfig(conv_algorithm="fft"))


def test_airbench94_with_winograd_matches_the_direct_model_and_scans():
    """The whole network with Winograd's convolutions: no XLA convolution left (so a CPU epoch
    scans), the logits and every parameter's gradient close to the direct model's (both in
    float32; a relative tolerance, as two float32 networks of 7 layers differ by rounding)."""
    direct = models.create_model("airbench94", width=0.125)
    fast = models.create_model("airbench94", width=0.125, conv=backends.with_algorithm(backends.XLA, "winograd").conv)
    assert loops.model_xla_convolutions(direct) > 0
    assert loops.model_xla_convolutions(fast) == 0
    assert loops.choose_loop("auto", fast) == "scan"
    variables = models.init_variables(direct, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10

    def loss(model, params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), logits

    (loss_direct, logits_direct), grads_direct = jax.value_and_grad(lambda p: loss(direct, p), has_aux=True)(variables["params"])
    (loss_fast, logits_fast), grads_fast = jax.value_and_grad(lambda p: loss(fast, p), has_aux=True)(variables["params"])
    np.testing.assert_allclose(logits_fast, logits_direct, rtol=1e-4, atol=1e-4 * float(jnp.abs(logits_direct).max()))
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads_fast), jax.tree.leaves(grads_fast), jax.tree.leaves(grads_direct)):
        scale = float(jnp.abs(b).max())
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-3 * scale + 1e-7, jax.tree_util.keystr(path[0])


def test_a_second_derivative_is_winograd_s_too_and_within_the_composed_bound():
    """conv3x3's backward pass is differentiable again: the Hessian-vector product of
    f(x) = |conv(x, w)|^2 / 2 along v is conv^T(conv(v, w)), two convolutions in a row, each
    within its bound; the first one's error then passes through the second at most as
    absolute_winograd(first bound, |w^T|)."""
    rng = np.random.default_rng(2)
    x, v = (rng.standard_normal((2, 7, 9, 4)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)

    def gradient(x):
        return jax.grad(lambda x: 0.5 * jnp.sum(winograd.conv3x3(x, jnp.asarray(w)) ** 2))(x)

    hvp = jax.grad(lambda x: jnp.vdot(gradient(x), jnp.asarray(v)))(jnp.asarray(x))  # H v: H is symmetric
    v64, w64 = v.astype(np.float64), w.astype(np.float64)
    flipped = w64[::-1, ::-1].transpose(0, 1, 3, 2)
    inner = conv_reference(v64, w64)
    inner_bound = gamma(FORWARD_CHAIN + 4) * absolute_winograd(v64, w64)
    exact = conv_reference(inner, flipped)
    bound = gamma(FORWARD_CHAIN + 6) * absolute_winograd(np.abs(inner) + inner_bound, flipped) + absolute_winograd(inner_bound, flipped)
    assert np.all(np.abs(np.asarray(hvp, np.float64) - exact) <= bound)
    assert not np.all(np.abs(np.asarray(hvp, np.float64) - conv_reference(inner, np.roll(flipped, 1, axis=1))) <= bound)
