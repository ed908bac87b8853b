"""airbench94's data-dependent first layer: the 2x2 patch-whitening kernel.

The `airbench94` model (`jaxres.models.Airbench94`) starts with a 2x2 convolution whose
kernel is not learned but computed from training images (legacy/airbench94.py,
`init_whitening_conv`): the eigenvectors of the 2x2 patch covariance, each scaled by
1 / sqrt(eigenvalue + eps), as +/- pairs. The whitened patches then have (nearly) the
identity covariance, which lets the network train at a high learning rate from step 0.
Its recipe is the `airbench94` preset (`jaxres.config.airbench94`).
"""

from __future__ import annotations

import numpy as np

from jaxres import augment

WHITENING_EPS = 5e-4  # legacy/airbench94.py init_whitening_conv(eps=5e-4)
WHITENING_IMAGES = 5000  # airbench: train_loader.images[:5000]
WHITENING_SAMPLE_SEED = 0  # the fixed sample below; the same for every run seed, as airbench's


def patch_covariance(images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """The (uncentred) covariance of every 2x2 patch (stride 1) of `images`:
    float[N, H, W, C] -> float64[4C, 4C], patch entries in (dy, dx, c) order, the order of
    the HWIO kernel's first three axes. Summed in float64 over chunks of images."""
    images = np.asarray(images)
    channels = images.shape[-1]
    total = np.zeros((4 * channels, 4 * channels))
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].astype(np.float64)
        height, width = x.shape[1] - 1, x.shape[2] - 1
        patches = np.concatenate(
            [x[:, dy : dy + height, dx : dx + width] for dy in (0, 1) for dx in (0, 1)], axis=-1
        ).reshape(-1, 4 * channels)
        total += patches.T @ patches
        count += patches.shape[0]
    return total / count


def whitening_kernel(images: np.ndarray, eps: float = WHITENING_EPS) -> np.ndarray:
    """The whitening kernel of `images` (normalised, float[N, H, W, C]): float32[2, 2, C, 8C].

    With the patch covariance's eigenvalues l_1 >= ... >= l_4C and unit eigenvectors v_i,
    output channel i < 4C is v_i / sqrt(l_i + eps) and channel 4C + i its negative (after
    GELU the pair keeps both signs of the projection). The whitened patches' covariance
    is then diag(l_i / (l_i + eps)): the identity along every direction well above eps.
    Eigenvector signs are whatever the solver returns (a sign flip swaps a pair's order).
    """
    covariance = patch_covariance(images)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    scaled = eigenvectors / np.sqrt(eigenvalues + eps)  # columns: filters in (dy, dx, c) order
    channels = images.shape[-1]
    return np.concatenate([scaled, -scaled], axis=1).reshape(2, 2, channels, 8 * channels).astype(np.float32)


def whitening_sample(train_images: np.ndarray, count: int = WHITENING_IMAGES) -> np.ndarray:
    """The `count` training images the whitening kernel is computed from: uint8[count, H, W, C].

    airbench takes the first 5,000 images of the official training files, which are in a
    random order; jaxres's sources may be sorted by class (an image folder is), so it takes
    the first `count` of the fixed permutation np.random.default_rng(0).permutation(N) — the
    same images for every run seed, as in airbench. A copy shuffled with that permutation
    therefore starts with exactly these images (benchmarks/README.md, the airbench94 row).
    """
    order = np.random.default_rng(WHITENING_SAMPLE_SEED).permutation(len(train_images))
    return np.asarray(train_images[order[:count]])  # gathered where they are (a device array too)


def init_whitening(variables: dict, train_images: np.ndarray) -> dict:
    """`variables` of an `airbench94` model with the whitening kernel computed from
    `whitening_sample(train_images)` (uint8[N, H, W, 3], the run's training subset, NumPy or
    on the device; normalised as training normalises)."""
    sample = np.asarray(augment.normalize(whitening_sample(train_images)))
    kernel = whitening_kernel(sample)
    params = dict(variables["params"])
    params["whiten"] = {**params["whiten"], "kernel": kernel}
    return {**variables, "params": params}
