"""Winograd's minimal filtering F(4x4, 3x3): the `conv_algorithm` "winograd".

A 3x3 convolution (stride 1, padding 1) computes each 4x4 block of outputs from the 6x6
block of inputs around it. Winograd's algorithm (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks", F(4x4, 3x3) with the points 0, +-1, +-2 and infinity)
transforms that input tile and the 3x3 filter into 6x6 tiles, multiplies them element by
element and transforms the product back:

    Y = A^T [ (G w G^T) * (B^T d B) ] A

Summed over input channels, the element-wise product is 36 independent matrix products,
[tiles, C_in] x [C_in, C_out], one per position of the 6x6 tile: 36 multiplications per 16
outputs and input channel instead of the direct method's 144, i.e. 4x fewer. The
transforms are additions and a few scalings, memory-bound, and here they are XLA
element-wise programs, each axis of the 6x6 tile transformed in turn (a separable
transform, with the intermediate written to memory: fused into one, XLA recomputes the
first axis's sums for every output and runs several times slower).

The gradients are Winograd's too (`conv3x3`): the input gradient is the same convolution
of the output gradient with the kernel rotated by 180 degrees and its channels swapped,
and the kernel gradient is G^T [sum over tiles of V^T (A dY A^T)] G, the same 36 matrix
products with the output gradient's transformed tiles.

Accuracy. The transforms' coefficients (up to 8, and 1/6 and 1/24) cost some of float32's
precision: at airbench94's shapes the largest error against a float64 reference is 5e-6 to
1.1e-5 of the largest output, 8-42x the direct method's (`tests/test_winograd.py` checks a
rigorous bound). In bfloat16 or float16 that would matter, so only float32 convolutions are
taken (`handles`); the others go to the backend below.

Speed: on a 2-core AMD EPYC (AVX2) airbench94's first epoch took 0.69x the time of its
direct convolutions (README.md, "Winograd convolutions on the CPU"; per layer:
`python -m benchmarks.onednn_conv --model airbench94`). On a GPU, cuDNN picks its own
algorithms (Winograd among them): the conv_algorithm "auto" leaves it to them.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxres import onednn

OUTPUT_TILE = 4  # m in F(m x m, 3 x 3)
INPUT_TILE = OUTPUT_TILE + 2  # each 4x4 output block reads a 6x6 input block

# Lavin & Gray 2016, F(4x4, 3x3): input transform B^T, filter transform G, output transform A^T.
INPUT_TRANSFORM = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
FILTER_TRANSFORM = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=np.float64,
)
OUTPUT_TRANSFORM = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=np.float64,
)


def handles(lhs, rhs, window_strides, padding, *args, **kwargs) -> bool:
    """Whether `conv3x3` computes this `lax.conv_general_dilated` call (as flax's nn.Conv
    makes it): a 3x3 stride-1 padding-1 convolution (`onednn.is_conv3x3_call`) of float32
    operands."""
    return (
        onednn.is_conv3x3_call(lhs, rhs, window_strides, padding, *args, **kwargs)
        and jnp.dtype(lhs.dtype) == jnp.float32
        and jnp.dtype(rhs.dtype) == jnp.float32
    )


@functools.cache  # one function per fallback, so that models built alike compare equal
def conv_general_dilated_with(fallback: Callable) -> Callable:
    """`jax.lax.conv_general_dilated` with the convolutions `handles` says yes to computed by
    `conv3x3`, the others by `fallback` (a function of the same signature)."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs):
        if handles(lhs, rhs, window_strides, padding, *args, **kwargs):
            return conv3x3(lhs, rhs)
        return fallback(lhs, rhs, window_strides, padding, *args, **kwargs)

    conv_general_dilated.__qualname__ = f"winograd_over_{getattr(fallback, '__qualname__', 'fallback')}"
    return conv_general_dilated


def _combine(arrays: list, matrix: np.ndarray) -> list:
    """[sum_i matrix[p, i] * arrays[i] for each row p], skipping zeros and multiplying by +-1 as
    additions (the transforms' matrices are small and sparse)."""
    out = []
    for row in matrix:
        total = None
        for coefficient, array in zip(row, arrays):
            if coefficient == 0:
                continue
            term = array if coefficient == 1 else -array if coefficient == -1 else array * np.float32(coefficient)
            total = term if total is None else total + term
        out.append(total)
    return out


def _strided(array, axis: int, start: int, count: int):
    """array[..., start : start + 4 * count : 4, ...] along `axis`: one tile row (or column)
    offset of every tile."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, start + OUTPUT_TILE * count, OUTPUT_TILE)
    return array[tuple(index)]


def _tile_transform(padded, matrix: np.ndarray, tiles: tuple[int, int]):
    """out[p, q, n, i, j, c] = sum_{a, b} matrix[p, a] matrix[q, b] padded[n, 4i + a, 4j + b, c]:
    the 2-D transform of every tile (a tile's side is matrix.shape[1], tiles start every 4
    pixels), one axis after the other."""
    size = matrix.shape[1]
    rows = jnp.stack(_combine([_strided(padded, 1, a, tiles[0]) for a in range(size)], matrix))
    rows = lax.optimization_barrier(rows)  # written once: fused, XLA would recompute it per output
    return jnp.stack(_combine([_strided(rows, 3, b, tiles[1]) for b in range(size)], matrix), axis=1)


def _tiles(height: int, width: int) -> tuple[int, int]:
    return -(-height // OUTPUT_TILE), -(-width // OUTPUT_TILE)


def input_tiles(x):
    """B^T d B for every 6x6 input tile d of x[N, H, W, C] padded by 1 (and up to a multiple
    of 4): float[36, N * tiles, C]."""
    n, height, width, channels = x.shape
    tiles = _tiles(height, width)
    padded = jnp.pad(x, ((0, 0), (1, 1 + 4 * tiles[0] - height), (1, 1 + 4 * tiles[1] - width), (0, 0)))
    return _tile_transform(padded, INPUT_TRANSFORM, tiles).reshape(INPUT_TILE**2, -1, channels)


def filter_tiles(w):
    """G w G^T for every input and output channel of w[3, 3, Ci, Co]: float[36, Ci, Co]."""
    transform = FILTER_TRANSFORM.astype(np.float32)
    return jnp.einsum("pa,abio,qb->pqio", transform, w, transform).reshape(INPUT_TILE**2, *w.shape[2:])


def output_from_tiles(products, n: int, height: int, width: int):
    """A^T M A for every tile's products M (float[36, N * tiles, Co]), laid out as the output
    float[N, H, W, Co]."""
    tiles = _tiles(height, width)
    channels = products.shape[-1]
    products = products.reshape(INPUT_TILE, INPUT_TILE, -1, channels)
    rows = jnp.stack(_combine([products[p] for p in range(INPUT_TILE)], OUTPUT_TRANSFORM))
    rows = lax.optimization_barrier(rows)
    blocks = jnp.stack(_combine([rows[:, q] for q in range(INPUT_TILE)], OUTPUT_TRANSFORM), axis=1)
    blocks = blocks.reshape(OUTPUT_TILE, OUTPUT_TILE, n, *tiles, channels).transpose(2, 3, 0, 4, 1, 5)
    return blocks.reshape(n, OUTPUT_TILE * tiles[0], OUTPUT_TILE * tiles[1], channels)[:, :height, :width]


def output_gradient_tiles(g):
    """A g A^T for every 4x4 block g of g[N, H, W, Co] (padded up to a multiple of 4): the
    output transform's adjoint, float[36, N * tiles, Co]."""
    n, height, width, channels = g.shape
    tiles = _tiles(height, width)
    padded = jnp.pad(g, ((0, 0), (0, 4 * tiles[0] - height), (0, 4 * tiles[1] - width), (0, 0)))
    return _tile_transform(padded, OUTPUT_TRANSFORM.T, tiles).reshape(INPUT_TILE**2, -1, channels)


def _batched_matmul(a, b, contract: tuple[int, int]):
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


def _forward(x, w):
    n, height, width, _ = x.shape
    return output_from_tiles(_batched_matmul(input_tiles(x), filter_tiles(w), (2, 1)), n, height, width)


@jax.custom_vjp
def conv3x3(x, w):
    """float32 x[N, H, W, Ci] (*) w[3, 3, Ci, Co], stride 1, padding 1 -> [N, H, W, Co] by
    Winograd's F(4x4, 3x3), its gradients too (reverse mode, to any order: the input
    gradient is `conv3x3` again, the kernel gradient plain JAX operations)."""
    return _forward(x, w)


def _conv3x3_forward(x, w):
    return _forward(x, w), (x, w)


def _conv3x3_backward(residuals, g):
    x, w = residuals
    input_gradient = conv3x3(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    products = _batched_matmul(input_tiles(x), output_gradient_tiles(g), (1, 1))  # [36, Ci, Co]
    transform = FILTER_TRANSFORM.astype(np.float32)
    products = products.reshape(INPUT_TILE, INPUT_TILE, *products.shape[1:])
    kernel_gradient = jnp.einsum("pa,pqio,qb->abio", transform, products, transform)
    return input_gradient, kernel_gradient


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)
