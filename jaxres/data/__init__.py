"""Datasets as uint8 arrays in host memory: CIFAR-10 from any of its usual forms, or synthetic shapes.

    dataset = jaxres.data.load_dataset("cifar10")   # or "shapes", or a path
    dataset.train.images, dataset.train.labels       # uint8[N, 32, 32, 3], int32[N]

The package's parts, each importing only those above it (and never this package's names):

    constants.py   CIFAR-10's class names, mean and std, the split names (no imports)
    containers.py  Split and Dataset, the arrays every source fills
    download.py    one file over HTTP(S), MD5-verified and written atomically
    readers.py     image folders, tars, the official pickles; decoding in forked workers
    shapes.py      the synthetic shapes dataset, with object masks
    sources.py     load_dataset: the dispatch, the decoded-array cache, the cifar10 source, the training subset

The names below are this package's public API, whichever part defines them. The constants and
the containers are imported with the package; the names of sources, readers, shapes and download
on first use (PEP 562), so that `jaxres.data.constants`, which Python reaches through this
package, costs no PIL, tarfile or network code (`jaxres.augment` reads the mean and std there).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxres.data.constants import ACCEPTED_SOURCES, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, SPLIT_NAMES
from jaxres.data.containers import Dataset, Split

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from jaxres.data.download import download_file
    from jaxres.data.readers import OFFICIAL_FOLDER, OFFICIAL_TRAIN_FILES
    from jaxres.data.shapes import SHAPES_CLASSES, make_shapes
    from jaxres.data.sources import (
        CACHE_FORMAT_VERSION,
        CIFAR10_ARCHIVE_MD5,
        CIFAR10_ARCHIVE_URL,
        CIFAR10_URL_VARIABLE,
        DOWNLOADS_FOLDER,
        check_train_subset,
        cifar10_archive_url,
        default_cache_dir,
        load_dataset,
        select_train_subset,
    )

# The part that defines each name imported on first use.
_LAZY_NAMES = {
    **dict.fromkeys(
        (
            "load_dataset",
            "default_cache_dir",
            "check_train_subset",
            "select_train_subset",
            "cifar10_archive_url",
            "CIFAR10_ARCHIVE_URL",
            "CIFAR10_ARCHIVE_MD5",
            "CIFAR10_URL_VARIABLE",
            "DOWNLOADS_FOLDER",
            "CACHE_FORMAT_VERSION",
        ),
        "sources",
    ),
    **dict.fromkeys(("OFFICIAL_FOLDER", "OFFICIAL_TRAIN_FILES"), "readers"),
    **dict.fromkeys(("make_shapes", "SHAPES_CLASSES"), "shapes"),
    "download_file": "download",
}

__all__ = [
    "ACCEPTED_SOURCES",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SPLIT_NAMES",
    "Dataset",
    "Split",
    *_LAZY_NAMES,
]


def __getattr__(name: str):
    """A lazy name's value, read from the part that defines it (which is imported on first use)."""
    part = _LAZY_NAMES.get(name)
    if part is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{part}"), name)


def __dir__() -> list[str]:
    """The public API and the parts' modules, for dir() and completion."""
    return sorted({*globals(), *__all__})
