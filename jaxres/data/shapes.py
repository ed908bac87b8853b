"""The synthetic `shapes` dataset: one coloured shape per image on a textured background, with masks.

    dataset = make_shapes(num_train=10000, num_test=2000, image_size=32, seed=0)
    dataset.test.images, dataset.test.labels, dataset.test.masks   # uint8[N,32,32,3], int32[N], bool[N,32,32]

`jaxres.data.load_dataset("shapes")` gives `make_shapes()` with its defaults. The classes
(`SHAPES_CLASSES`) are circle, square, triangle, cross and ring; every class has the same
distribution of object area (10-25 % of the image) and colour, so only the shape tells the
class, and the object masks make the data a test of Grad-CAM localisation
(`jaxres.cam_metrics.energy_pointing_game`). NumPy only, deterministic per seed, about a
second for the default 12000 images.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from jaxres.data.containers import Dataset, Split
from jaxres.errors import JaxresError

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

_CROSS_HALF_WIDTH = 1 / 3  # arm half-width of a cross, relative to its half-length
_RING_INNER_RADIUS = 0.55  # hole radius of a ring, relative to its outer radius
# Area of each shape at scale 1 (in the shape's own units), so all classes get the same pixel area.
_SHAPE_UNIT_AREA = np.array(
    [
        np.pi,  # circle of radius 1
        4.0,  # square of half-side 1
        3 * np.sqrt(3) / 4,  # equilateral triangle of circumradius 1
        8 * _CROSS_HALF_WIDTH - 4 * _CROSS_HALF_WIDTH**2,  # plus sign of half-length 1
        np.pi * (1 - _RING_INNER_RADIUS**2),  # ring of outer radius 1
    ]
)
# Radius of the circle around each shape at scale 1, so shapes stay inside the image.
_SHAPE_BOUNDING_RADIUS = np.array([1.0, np.sqrt(2), 1.0, np.hypot(1, _CROSS_HALF_WIDTH), 1.0])
_SHAPE_AREA_FRACTION = (0.10, 0.25)  # object area as a fraction of the image area
_SUPERSAMPLING = 2  # sub-pixel samples per axis for anti-aliased edges
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance between the object colour and the background's colours


def _shape_inside(class_index: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v) (shape units, centred, unrotated) lie inside shape `class_index`."""
    name = SHAPES_CLASSES[class_index]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if name == "triangle":  # edges at distance 1/2 from the centre, one vertex pointing up
        inside = np.ones(u.shape, bool)
        for k in range(3):
            normal_angle = np.pi / 2 + 2 * np.pi * k / 3  # Python floats keep u, v in float32
            inside &= u * math.cos(normal_angle) + v * math.sin(normal_angle) <= 0.5
        return inside
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_HALF_WIDTH) & (av <= 1.0)) | ((av <= _CROSS_HALF_WIDTH) & (au <= 1.0))
    if name == "ring":
        squared_radius = u * u + v * v
        return (squared_radius <= 1.0) & (squared_radius >= _RING_INNER_RADIUS**2)
    raise AssertionError(name)


def _shape_coverage(labels, centres, scales, angles, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by its image's shape: float32[N, S, S].

    labels: int32[N]; centres: float[N, 2] (x, y) in pixels; scales: float[N] pixels per shape
    unit; angles: float[N] radians.
    """
    offsets = (np.arange(_SUPERSAMPLING) + 0.5) / _SUPERSAMPLING
    axis = (np.arange(image_size)[:, None] + offsets[None, :]).reshape(-1).astype(np.float32)
    coverage = np.zeros((labels.shape[0], image_size, image_size), np.float32)
    for class_index in range(len(SHAPES_CLASSES)):
        members = np.flatnonzero(labels == class_index)
        if members.size == 0:
            continue
        cos = np.cos(angles[members]) / scales[members]
        sin = np.sin(angles[members]) / scales[members]
        dx = axis[None, :] - centres[members, 0, None]  # [M, S * supersampling], x offsets in pixels
        dy = axis[None, :] - centres[members, 1, None]
        # Rotate by -angle and scale to shape units; separable, so only the final sums are full-size.
        u = (dx * cos[:, None]).astype(np.float32)[:, None, :] + (dy * sin[:, None]).astype(np.float32)[:, :, None]
        v = (dy * cos[:, None]).astype(np.float32)[:, :, None] - (dx * sin[:, None]).astype(np.float32)[:, None, :]
        inside = _shape_inside(class_index, u, v)
        hits = inside.view(np.uint8)
        sub_pixels = itertools.product(range(_SUPERSAMPLING), repeat=2)
        samples_inside = sum(hits[:, i::_SUPERSAMPLING, j::_SUPERSAMPLING] for i, j in sub_pixels)
        coverage[members] = samples_inside * np.float32(1 / _SUPERSAMPLING**2)
    return coverage


def _background_texture(rng: np.random.Generator, count: int, image_size: int) -> np.ndarray:
    """Smooth random blobs mixed with stripes of random frequency and orientation: float32[N, S, S] in [0, 1]."""
    grid = 5
    coarse = rng.random((count, grid, grid), dtype=np.float32)
    positions = np.linspace(0, grid - 1, image_size)
    lower = np.minimum(np.floor(positions).astype(int), grid - 2)
    weight = (positions - lower).astype(np.float32)
    interpolation = np.zeros((image_size, grid), np.float32)  # bilinear upsampling as a matrix
    interpolation[np.arange(image_size), lower] = 1 - weight
    interpolation[np.arange(image_size), lower + 1] = weight
    blobs = interpolation @ coarse @ interpolation.T
    low, high = blobs.min(axis=(1, 2), keepdims=True), blobs.max(axis=(1, 2), keepdims=True)
    blobs = (blobs - low) / np.maximum(high - low, 1e-6)
    cycles = rng.uniform(1.5, 4.0, count).astype(np.float32)[:, None, None]
    orientation = rng.uniform(0, np.pi, count).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, count).astype(np.float32)[:, None, None]
    coordinate = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    along = (
        np.cos(orientation)[:, None, None] * coordinate[None, None, :]
        + np.sin(orientation)[:, None, None] * coordinate[None, :, None]
    )
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along + phase)
    mix = rng.uniform(0.2, 0.8, count).astype(np.float32)[:, None, None]
    return mix * blobs + (1 - mix) * stripes


def _distance_to_segment(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Euclidean distance from points[..., 3] to the segments start[..., 3]-end[..., 3]."""
    direction = end - start
    length_squared = np.maximum(np.sum(direction * direction, axis=-1, keepdims=True), 1e-6)
    t = np.clip(np.sum((points - start) * direction, axis=-1, keepdims=True) / length_squared, 0, 1)
    return np.linalg.norm(points - (start + t * direction), axis=-1)


def _object_colours(rng: np.random.Generator, background_start: np.ndarray, background_end: np.ndarray) -> np.ndarray:
    """A random colour per image that stands out from its background's colour range: float32[N, 3]."""
    candidates = rng.uniform(0, 255, (16, *background_start.shape)).astype(np.float32)
    distances = _distance_to_segment(candidates, background_start[None], background_end[None])  # [16, N]
    good = distances >= _MIN_COLOUR_DISTANCE
    choice = np.where(good.any(axis=0), good.argmax(axis=0), distances.argmax(axis=0))
    return candidates[choice, np.arange(background_start.shape[0])]


def _make_shapes_split(rng: np.random.Generator, count: int, image_size: int) -> Split:
    """`count` class-balanced shape images: uint8[N, S, S, 3], labels int32[N], masks bool[N, S, S]."""
    num_classes = len(SHAPES_CLASSES)
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int32)
    area = rng.uniform(*_SHAPE_AREA_FRACTION, count) * image_size**2
    scales = np.sqrt(area / _SHAPE_UNIT_AREA[labels])
    radii = scales * _SHAPE_BOUNDING_RADIUS[labels]
    centres = rng.uniform(radii[:, None], image_size - radii[:, None], (count, 2))
    angles = rng.uniform(0, 2 * np.pi, count)
    background_start = rng.uniform(0, 255, (count, 3)).astype(np.float32)
    background_end = rng.uniform(0, 255, (count, 3)).astype(np.float32)
    object_colours = _object_colours(rng, background_start, background_end)
    texture = _background_texture(rng, count, image_size)
    coverage = _shape_coverage(labels, centres, scales, angles, image_size)
    images = texture[..., None] * (background_end - background_start)[:, None, None, :]
    images += background_start[:, None, None, :]
    object_minus_background = object_colours[:, None, None, :] - images
    object_minus_background *= coverage[..., None]
    images += object_minus_background
    return Split(np.clip(np.rint(images, out=images), 0, 255, out=images).astype(np.uint8), labels, coverage >= 0.5)


def make_shapes(num_train: int = 10000, num_test: int = 2000, image_size: int = 32, seed: int = 0) -> Dataset:
    """A synthetic dataset: one coloured shape per image (class = the shape) on a textured background.

    Each image is uint8[image_size, image_size, 3]: a circle, square, triangle, cross or ring
    (`SHAPES_CLASSES`) at a random position, rotation and colour, covering 10-25% of the image
    (the same area distribution for every class, so neither size nor colour tells the class), on
    a background of random colours mixing smooth blobs and stripes. Splits carry the object
    masks (bool[N, H, W]); classes are balanced. The same arguments give identical arrays.
    """
    if num_train < 1 or num_test < 1:
        raise JaxresError(
            f"make_shapes needs at least one image per split, got num_train={num_train}, num_test={num_test}"
        )
    if image_size < 8:
        raise JaxresError(f"make_shapes needs image_size >= 8 to draw recognisable shapes, got {image_size}")
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    train_rng, test_rng = np.random.default_rng(train_seed), np.random.default_rng(test_seed)
    return Dataset(
        _make_shapes_split(train_rng, num_train, image_size),
        _make_shapes_split(test_rng, num_test, image_size),
        SHAPES_CLASSES,
        f"synthetic shapes (seed {seed}, {num_train} train / {num_test} test, {image_size}x{image_size})",
    )
