"""Augmentation properties: shapes, dtypes, crop = shifted window, flip = mirror, cutout = one square."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import augment


@pytest.fixture
def images():
    return jnp.asarray(np.random.default_rng(0).integers(1, 256, size=(16, 32, 32, 3), dtype=np.uint8))


def test_normalize_matches_numpy(images):
    expected = (np.asarray(images, np.float64) / 255 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
    result = augment.normalize(images)
    chex.assert_type(result, jnp.float32)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image(images):
    cropped = np.asarray(jax.jit(augment.random_crop, static_argnums=2)(jax.random.PRNGKey(0), images, 4))
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = []
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(padded[i, dy : dy + 32, dx : dx + 32], cropped[i])]
        assert len(matches) == 1, f"image {i}: crop is not exactly one window of the padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 4, "offsets should vary between images"


def test_random_flip_mirrors_or_keeps_each_image(images):
    flipped = np.asarray(augment.random_flip(jax.random.PRNGKey(3), images))
    original = np.asarray(images)
    mirrored = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, original)]
    kept = [np.array_equal(f, o) for f, o in zip(flipped, original)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 0 < sum(mirrored) < len(images)


def test_cutout_zeroes_exactly_one_square_per_image(images):
    out = np.asarray(augment.cutout(jax.random.PRNGKey(5), images, 8))
    zero = np.all(out == 0, axis=-1)  # the inputs have no zero pixels
    for i in range(len(images)):
        rows, cols = np.nonzero(zero[i])
        assert zero[i].sum() == 64
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7
        unchanged = ~zero[i]
        np.testing.assert_array_equal(out[i][unchanged], np.asarray(images)[i][unchanged])


def test_augment_batch_is_deterministic_in_the_key_and_keeps_dtype(images):
    run = jax.jit(augment.augment_batch)
    a, b, c = run(jax.random.PRNGKey(0), images), run(jax.random.PRNGKey(0), images), run(jax.random.PRNGKey(1), images)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a, c)
    chex.assert_type(a, jnp.uint8)
    chex.assert_shape(a, images.shape)


def test_disabled_augmentations_are_the_identity(images):
    same = augment.augment_batch(jax.random.PRNGKey(0), images, crop_padding=0, flip=False, cutout_size=0)
    chex.assert_trees_all_equal(same, images)
