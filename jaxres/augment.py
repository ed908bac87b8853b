"""On-device augmentations: pure, batched, jit-able functions of an explicit PRNG key.

All of them take and return NHWC batches and never change the dtype, so they can run
on the uint8 images (cheap to gather and move) before `normalize` makes them float32.
Each image gets its own randomness, drawn from `key` split per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxres.config import CROP_PADDING_MODES, MIX_METHODS, check_choice
from jaxres.data.constants import CIFAR10_MEAN, CIFAR10_STD  # per channel, on the [0, 1] scale
from jaxres.errors import JaxresError


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype=jnp.float32) -> jax.Array:
    """Pixels in [0, 255] -> (x / 255 - mean) / std, computed in `dtype`.

    images: uint8 or float[..., 3] -> dtype[..., 3] (float32; float64 for the float64 models
    of the numerical reference tests).
    """
    mean = jnp.asarray(mean, dtype) * 255.0
    inverse_std = 1.0 / (jnp.asarray(std, dtype) * 255.0)
    return (jnp.asarray(images, dtype) - mean) * inverse_std


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4, mode: str = "zeros") -> jax.Array:
    """Pad by `padding` on each side, then cut a random window of the original size.

    images: T[N, H, W, C] -> T[N, H, W, C]. Offsets are uniform in [0, 2 * padding].
    mode: "zeros" (the recipe's pad-crop) or "reflect" (mirrored edges without repeating the
    border pixel, as torch's F.pad(..., 'reflect'): airbench's random translation).
    """
    if padding == 0:
        return images
    check_choice("crop padding mode", mode, CROP_PADDING_MODES)
    n, height, width, _ = images.shape
    pad_mode = "constant" if mode == "zeros" else "reflect"
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

    return jax.vmap(crop_one)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, flip: jax.Array | None = None) -> jax.Array:
    """Mirror each image left-right with probability 1/2, or where `flip` (bool[N]) says.
    T[N, H, W, C] -> T[N, H, W, C]."""
    if flip is None:
        flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def alternating_flips(key: jax.Array, indices: jax.Array, epoch: jax.Array) -> jax.Array:
    """airbench's alternating flip: which images of a batch to mirror in epoch `epoch`.

    indices: int[B], the images' positions in the training set; epoch: int[] (from 0) ->
    bool[B]. Image i is mirrored in even epochs when its coin bernoulli(fold_in(key, i))
    comes up, and in odd epochs when it does not: every image on exactly every other epoch
    (legacy/airbench94.py flips a random half once, then all of them in odd epochs). The
    coins depend on `key` and i only, so they stay fixed for the run."""
    coins = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(indices)
    return coins ^ (epoch % 2 == 1)


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
    key: jax.Array,
    images: jax.Array,
    crop_padding: int = 4,
    flip: bool = True,
    cutout_size: int = 8,
    crop_mode: str = "zeros",
    flips: jax.Array | None = None,
) -> jax.Array:
    """The training augmentation: pad-crop, then flip, then cutout.  T[N,H,W,C] -> T[N,H,W,C].
    `flips` (bool[N], e.g. `alternating_flips`) replaces the random flips when given."""
    crop_key, flip_key, cutout_key = jax.random.split(key, 3)
    images = random_crop(crop_key, images, crop_padding, crop_mode)
    if flip:
        images = random_flip(flip_key, images, flips)
    return cutout(cutout_key, images, cutout_size)


# --------------------------------------------------------------------------- label-mixing augmentations
#
# These take soft labels too, `labels: float[N, K]` (one-hot, possibly smoothed), and
# return the mixed images (same dtype) with the mixed labels float32[N, K] that the
# loss must use: cross-entropy against soft targets. Label smoothing commutes with the
# mixing (both are affine), so smooth before or after, it is the same.

# each paper's CIFAR-10 setting: RICAP beta 0.3, mixup alpha 1, CutMix alpha (their beta) 1
MIX_DEFAULT_ALPHA = {"ricap": 0.3, "mixup": 1.0, "cutmix": 1.0}


def _check_positive(name: str, value) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise JaxresError(f"{name} must be positive, got {value}")


def _mix_pixels(weight, images, partner_images):
    """weight * images + (1 - weight) * partner_images in float32, back to the images' dtype
    (integers rounded: uint8 pixels carry at most 0.5 / 255 of error against the labels)."""
    mixed = weight * images.astype(jnp.float32) + (1 - weight) * partner_images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        info = jnp.iinfo(images.dtype)
        mixed = jnp.clip(jnp.round(mixed), info.min, info.max)
    return mixed.astype(images.dtype)


def ricap(key: jax.Array, images: jax.Array, labels: jax.Array, beta: float = 0.3, per_image: bool = True):
    """RICAP (Takahashi et al. 2018): four images' crops patched into one, labels mixed by area.

    images: T[N, H, W, C]; labels: float[N, K] (one-hot or soft) -> (T[N, H, W, C],
    float32[N, K]). A boundary point (h, w) = round((H, W) * Beta(beta, beta)) splits the
    output into four quadrants: top-left h x w, top-right h x (W - w), bottom-left
    (H - h) x w, bottom-right (H - h) x (W - w). Quadrant q is filled with a crop of that
    size, at a uniformly random position, of image sources[n, q] of the batch, where
    sources[:, q] is a random permutation of the batch (one per quadrant, so every image is
    used once per quadrant). The label is sum_q (area_q / (H W)) * labels[sources[n, q]].

    per_image=True (default) draws the boundary and the crop positions per output image;
    per_image=False draws them once per batch, as the paper's code does (its permutations
    are per batch too, as here). Small beta puts the boundary near the corners (one image
    dominates; beta -> 0 is no mixing), beta -> infinity at the centre (four equal
    quarters); the paper uses 0.3. Pure, keyed, jit-able (beta and per_image static).
    """
    _check_positive("ricap beta", beta)
    n, height, width, _ = images.shape
    boundary_key, position_key, permutation_key = jax.random.split(key, 3)
    count = n if per_image else 1
    fractions = jax.random.beta(boundary_key, beta, beta, (2, count))
    h = jnp.broadcast_to(jnp.round(fractions[0] * height).astype(jnp.int32), (n,))
    w = jnp.broadcast_to(jnp.round(fractions[1] * width).astype(jnp.int32), (n,))
    crop_heights = jnp.stack([h, h, height - h, height - h], axis=1)  # [N, 4]
    crop_widths = jnp.stack([w, width - w, w, width - w], axis=1)
    # crop corners, uniform over the positions that keep each crop inside its source
    uniforms = jnp.broadcast_to(jax.random.uniform(position_key, (2, count, 4)), (2, n, 4))
    tops = jnp.minimum(jnp.floor(uniforms[0] * (height - crop_heights + 1)).astype(jnp.int32), height - crop_heights)
    lefts = jnp.minimum(jnp.floor(uniforms[1] * (width - crop_widths + 1)).astype(jnp.int32), width - crop_widths)
    sources = jnp.stack([jax.random.permutation(k, n) for k in jax.random.split(permutation_key, 4)], axis=1)

    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    bottom = rows >= h[:, None, None]  # [N, H, 1]
    right = cols >= w[:, None, None]  # [N, 1, W]
    quadrant = (2 * bottom + right).reshape(n, -1)  # [N, H * W] in 0..3
    per_pixel = lambda values: jnp.take_along_axis(values, quadrant, axis=1).reshape(n, height, width)  # noqa: E731
    source_rows = rows - jnp.where(bottom, h[:, None, None], 0) + per_pixel(tops)
    source_cols = cols - jnp.where(right, w[:, None, None], 0) + per_pixel(lefts)
    patched = images[per_pixel(sources), source_rows, source_cols]

    areas = (crop_heights * crop_widths).astype(jnp.float32) / (height * width)  # [N, 4], sums to 1
    mixed_labels = jnp.einsum("nq,nqk->nk", areas, jnp.asarray(labels, jnp.float32)[sources])
    return patched, mixed_labels


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 0.2, per_image: bool = True):
    """mixup (Zhang et al. 2018): a convex combination of each image with a partner.

    images: T[N, H, W, C]; labels: float[N, K] -> (T[N, H, W, C], float32[N, K]).
    lam ~ Beta(alpha, alpha); partner = a random permutation of the batch; image =
    lam * image + (1 - lam) * partner (in float32, rounded back for integer dtypes: exact
    on float inputs, within half a grey level on uint8); label likewise with lam.
    per_image: one lam per image (default) or one per batch (as the paper's code).
    """
    _check_positive("mixup alpha", alpha)
    n = images.shape[0]
    weight_key, permutation_key = jax.random.split(key)
    lam = jnp.broadcast_to(jax.random.beta(weight_key, alpha, alpha, (n if per_image else 1,)), (n,))
    partner = jax.random.permutation(permutation_key, n)
    mixed_images = _mix_pixels(lam[:, None, None, None], images, images[partner])
    labels = jnp.asarray(labels, jnp.float32)
    return mixed_images, lam[:, None] * labels + (1 - lam[:, None]) * labels[partner]


def cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 1.0, per_image: bool = True):
    """CutMix (Yun et al. 2019): a box of each image replaced by the same box of a partner.

    images: T[N, H, W, C]; labels: float[N, K] -> (T[N, H, W, C], float32[N, K]).
    As the paper's code: lam ~ Beta(alpha, alpha); a box of about (1 - lam) H x (1 - lam) W
    area (sides round(H sqrt(1 - lam)), round(W sqrt(1 - lam))) centred at a uniform pixel,
    clipped to the image; the partner is a random permutation of the batch. The label
    weight of the partner is the box's actual (clipped) area fraction, so labels match
    the pixels exactly. per_image: one box per image (default) or one per batch.
    """
    _check_positive("cutmix alpha", alpha)
    n, height, width, _ = images.shape
    weight_key, centre_key, permutation_key = jax.random.split(key, 3)
    count = n if per_image else 1
    lam = jax.random.beta(weight_key, alpha, alpha, (count,))
    cut = jnp.sqrt(1.0 - lam)
    half_h = jnp.round(height * cut).astype(jnp.int32) // 2
    half_w = jnp.round(width * cut).astype(jnp.int32) // 2
    centre_y = jax.random.randint(centre_key, (count,), 0, height)
    centre_x = jax.random.randint(jax.random.fold_in(centre_key, 1), (count,), 0, width)
    top, bottom = jnp.clip(centre_y - half_h, 0, height), jnp.clip(centre_y + half_h, 0, height)
    left, right = jnp.clip(centre_x - half_w, 0, width), jnp.clip(centre_x + half_w, 0, width)
    top, bottom, left, right = (jnp.broadcast_to(v, (n,))[:, None, None] for v in (top, bottom, left, right))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [N, H, W]
    partner = jax.random.permutation(permutation_key, n)
    mixed_images = jnp.where(inside[..., None], images[partner], images)
    box_fraction = inside.mean(axis=(1, 2), dtype=jnp.float32)[:, None]
    labels = jnp.asarray(labels, jnp.float32)
    return mixed_images, (1 - box_fraction) * labels + box_fraction * labels[partner]


def mix_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, method: str = "none", alpha: float | None = None
):
    """Apply the label-mixing augmentation `method` in MIX_METHODS with parameter `alpha`
    (RICAP's beta, mixup's or CutMix's alpha; None: MIX_DEFAULT_ALPHA[method]).
    (T[N, H, W, C], float[N, K]) -> (T[N, H, W, C], float32[N, K]); "none" returns the
    inputs (labels as float32)."""
    if method == "none":
        return images, jnp.asarray(labels, jnp.float32)
    check_choice("mix method", method, MIX_METHODS)
    functions = {"ricap": ricap, "mixup": mixup, "cutmix": cutmix}
    return functions[method](key, images, labels, MIX_DEFAULT_ALPHA[method] if alpha is None else alpha)
