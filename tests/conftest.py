"""Shared fixtures: the real CIFAR-10 copy kept beside the project (skipped when absent)."""

import os
from pathlib import Path

import pytest

import jaxres  # noqa: F401  (first, so its XLA defaults apply before any JAX computation)

CIFAR10_JPEG_PATH = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """Path to ../shared/data/cifar10-jpeg.tar.gz (60,000 CIFAR-10 JPEGs), or skip the test."""
    if not CIFAR10_JPEG_PATH.is_file():
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR10_JPEG_PATH}; put cifar10-jpeg.tar.gz there to run this test")
    return CIFAR10_JPEG_PATH


@pytest.fixture(scope="session")
def cifar10_dataset(cifar10_jpeg, tmp_path_factory):
    """The real CIFAR-10 copy as a jaxres Dataset, decoded once per session (cached in
    $JAXRES_CACHE when set, so later sessions load it in about a second)."""
    from jaxres.data import load_dataset

    cache_dir = os.environ.get("JAXRES_CACHE") or tmp_path_factory.mktemp("jaxres-cache")
    return load_dataset(cifar10_jpeg, cache_dir=cache_dir, progress=False)
