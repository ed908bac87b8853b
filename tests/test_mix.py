"""Label-mixing augmentations (RICAP, mixup, CutMix): the labels match the pixels.

The test images encode where every pixel came from: image i has pixel (r, c) =
(i, r, c), so an output pixel names its source image and source position, and with
one-hot labels of the image index (K = N) a mixed label is the share of each source.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import augment
from jaxres.errors import JaxresError

N, SIZE = 8, 32


@pytest.fixture(scope="module")
def coded_images():
    index, rows, cols = np.meshgrid(np.arange(N), np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return jnp.asarray(np.stack([index, rows, cols], axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def index_labels():
    return jnp.eye(N, dtype=jnp.float32)


# beta is traced, not static, so that every beta shares one compilation (they are slow on CPU)
_ricap_jit = jax.jit(augment.ricap, static_argnames=("per_image",))


def ricap_jit(key, images, labels, beta=0.3, per_image=True):
    return _ricap_jit(key, images, labels, jnp.float32(beta), per_image)  # always called the same way: one cache entry


def source_shares(patched: np.ndarray) -> np.ndarray:
    """float[N, N]: the fraction of output n's pixels that come from image k."""
    counts = np.stack([np.bincount(image[..., 0].ravel(), minlength=N) for image in patched])
    return counts / (SIZE * SIZE)


def quadrant_boundary(patched_image: np.ndarray) -> tuple[int | None, int | None]:
    """Check that the output is four quadrants, each one contiguous crop of one image, and
    return their boundary (h, w) (None where two neighbouring quadrants happen to continue
    one crop). A quadrant is a crop iff (source image, row offset, column offset) is
    constant over it, so that key may only change across one row h and one column w."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    source = patched_image.astype(np.int64)
    keys = source[..., 0] * 10_000 + (source[..., 1] - rows + SIZE) * 100 + (source[..., 2] - cols + SIZE)
    change_rows = np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1
    change_cols = np.flatnonzero((keys[:, 1:] != keys[:, :-1]).any(axis=0)) + 1
    assert len(change_rows) <= 1 and len(change_cols) <= 1, "not four quadrants of contiguous crops"
    return (int(change_rows[0]) if len(change_rows) else None, int(change_cols[0]) if len(change_cols) else None)


@pytest.mark.parametrize("per_image", [True, False])
def test_ricap_labels_are_the_area_of_each_source_and_quadrants_are_crops(coded_images, index_labels, per_image):
    patched, labels = ricap_jit(jax.random.PRNGKey(0), coded_images, index_labels, 0.3, per_image)
    chex.assert_type(patched, jnp.uint8)
    chex.assert_shape(patched, coded_images.shape)
    chex.assert_type(labels, jnp.float32)
    chex.assert_shape(labels, (N, N))
    patched, labels = np.asarray(patched), np.asarray(labels)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(labels, source_shares(patched), atol=1e-6)
    boundaries = [quadrant_boundary(image) for image in patched]
    if not per_image:  # one boundary and one set of crop positions for the batch: only the sources differ
        np.testing.assert_array_equal(patched[..., 1:], np.broadcast_to(patched[:1, ..., 1:], patched[..., 1:].shape))
    else:
        assert len(set(boundaries)) > 1


def test_ricap_uses_every_image_once_per_quadrant(coded_images, index_labels):
    patched, labels = ricap_jit(jax.random.PRNGKey(3), coded_images, index_labels, 1000.0)
    # with beta huge the boundary is at the centre: the 4 corner pixels name the 4 sources
    corners = np.asarray(patched)[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]  # [N, 4]
    for quadrant in range(4):
        assert sorted(corners[:, quadrant]) == list(range(N))


def test_ricap_beta_extremes(coded_images, index_labels):
    _, near_zero = ricap_jit(jax.random.PRNGKey(1), coded_images, index_labels, 1e-3)
    assert np.all(np.asarray(near_zero).max(axis=1) > 0.9), "tiny beta: one image should (nearly) fill each output"
    patched, _ = ricap_jit(jax.random.PRNGKey(1), coded_images, index_labels, 1e3)
    boundaries = np.array([quadrant_boundary(image) for image in np.asarray(patched)], dtype=float)
    assert np.nanmax(np.abs(boundaries - SIZE / 2)) <= 2, "huge beta: the boundary should sit at the centre"


def test_ricap_is_deterministic_in_the_key_and_works_on_floats(coded_images, index_labels):
    beta = 0.3
    a = ricap_jit(jax.random.PRNGKey(7), coded_images, index_labels, beta)
    b = ricap_jit(jax.random.PRNGKey(7), coded_images, index_labels, beta)
    c = ricap_jit(jax.random.PRNGKey(8), coded_images, index_labels, beta)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[0], c[0])
    floats, float_labels = ricap_jit(jax.random.PRNGKey(7), coded_images.astype(jnp.float32), index_labels, beta)
    chex.assert_type(floats, jnp.float32)
    np.testing.assert_array_equal(np.asarray(floats), np.asarray(a[0], np.float32))
    np.testing.assert_array_equal(float_labels, a[1])


def test_ricap_mixes_soft_labels_linearly(coded_images):
    soft = jnp.asarray(np.random.default_rng(2).dirichlet(np.ones(N), N), jnp.float32)  # N classes: no recompile
    beta = 0.3
    _, identity_mixed = ricap_jit(jax.random.PRNGKey(4), coded_images, jnp.eye(N), beta)
    _, mixed = ricap_jit(jax.random.PRNGKey(4), coded_images, soft, beta)
    np.testing.assert_allclose(mixed, np.asarray(identity_mixed) @ np.asarray(soft), atol=1e-6)


def test_mixup_image_is_the_label_weighted_sum_of_the_sources(coded_images, index_labels):
    floats = jax.random.uniform(jax.random.PRNGKey(0), coded_images.shape) * 255
    mixed, labels = jax.jit(augment.mixup)(jax.random.PRNGKey(5), floats, index_labels, 0.4)
    labels = np.asarray(labels)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all((labels > 0).sum(axis=1) <= 2)
    expected = np.einsum("nk,khwc->nhwc", labels, np.asarray(floats))
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-3)
    as_uint8, uint8_labels = jax.jit(augment.mixup)(jax.random.PRNGKey(5), coded_images, index_labels, 0.4)
    chex.assert_type(as_uint8, jnp.uint8)
    expected = np.einsum("nk,khwc->nhwc", np.asarray(uint8_labels), np.asarray(coded_images, np.float64))
    assert np.abs(np.asarray(as_uint8, np.float64) - expected).max() <= 0.5 + 1e-4


def test_cutmix_label_weights_are_the_pasted_box_area(coded_images, index_labels):
    mixed, labels = jax.jit(augment.cutmix)(jax.random.PRNGKey(6), coded_images, index_labels, 1.0)
    chex.assert_type(mixed, jnp.uint8)
    mixed, labels = np.asarray(mixed), np.asarray(labels)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(labels, source_shares(mixed), atol=1e-6)
    for n in range(N):
        pasted = mixed[n, ..., 0] != n
        if pasted.any():  # one box, pasted in place (same position in the partner)
            rows, cols = np.nonzero(pasted)
            assert pasted.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            np.testing.assert_array_equal(mixed[n][pasted][:, 1:], np.asarray(coded_images)[n][pasted][:, 1:])


def test_mix_batch_dispatches_and_rejects_bad_arguments(coded_images, index_labels, monkeypatch):
    images, labels = augment.mix_batch(jax.random.PRNGKey(0), coded_images, index_labels, "none")
    chex.assert_trees_all_equal((images, labels), (coded_images, index_labels))
    for method in ("ricap", "mixup", "cutmix"):
        monkeypatch.setattr(augment, method, lambda key, images, labels, alpha, name=method: (name, alpha))
        assert augment.mix_batch(jax.random.PRNGKey(0), coded_images, index_labels, method, 0.7) == (method, 0.7)
        default = augment.MIX_DEFAULT_ALPHA[method]
        assert augment.mix_batch(jax.random.PRNGKey(0), coded_images, index_labels, method) == (method, default)
    monkeypatch.undo()
    with pytest.raises(JaxresError, match="unknown mix method 'mosaic'"):
        augment.mix_batch(jax.random.PRNGKey(0), coded_images, index_labels, "mosaic")
    with pytest.raises(JaxresError, match="ricap beta must be positive"):
        augment.ricap(jax.random.PRNGKey(0), coded_images, index_labels, 0.0)
