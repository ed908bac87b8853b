"""On-device augmentations: pure, batched, jit-able functions of an explicit PRNG key.

All of them take and return NHWC batches and never change the dtype, so they can run
on the uint8 images (cheap to gather and move) before `normalize` makes them float32.
Each image gets its own randomness, drawn from `key` split per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxres.data import CIFAR10_MEAN, CIFAR10_STD  # per channel, on the [0, 1] scale


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> jax.Array:
    """Pixels in [0, 255] -> (x / 255 - mean) / std.

    images: uint8 or float[..., 3] -> float32[..., 3].
    """
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    inverse_std = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return (jnp.asarray(images, jnp.float32) - mean) * inverse_std


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Zero-pad by `padding` on each side, then cut a random window of the original size.

    images: T[N, H, W, C] -> T[N, H, W, C]. Offsets are uniform in [0, 2 * padding].
    """
    if padding == 0:
        return images
    n, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

    return jax.vmap(crop_one)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2.  T[N, H, W, C] -> T[N, H, W, C]."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def cutout(key: jax.Array, images: jax.Array, size: int = 8) -> jax.Array:
    """Zero one `size` x `size` square per image, placed wholly inside it at random.

    images: T[N, H, W, C] -> T[N, H, W, C]. The square's top-left corner is uniform over
    the positions that keep it inside the image, so exactly size * size pixels are zeroed.
    """
    if size == 0:
        return images
    n, height, width, _ = images.shape
    corner_key_y, corner_key_x = jax.random.split(key)
    top = jax.random.randint(corner_key_y, (n, 1, 1), 0, height - size + 1)
    left = jax.random.randint(corner_key_x, (n, 1, 1), 0, width - size + 1)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def augment_batch(
    key: jax.Array, images: jax.Array, crop_padding: int = 4, flip: bool = True, cutout_size: int = 8
) -> jax.Array:
    """The training augmentation: pad-crop, then flip, then cutout.  T[N,H,W,C] -> T[N,H,W,C]."""
    crop_key, flip_key, cutout_key = jax.random.split(key, 3)
    images = random_crop(crop_key, images, crop_padding)
    if flip:
        images = random_flip(flip_key, images)
    return cutout(cutout_key, images, cutout_size)
