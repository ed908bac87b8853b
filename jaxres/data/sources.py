"""`load_dataset`: CIFAR-10 from any of its usual forms, or synthetic shapes, as uint8 arrays in host memory.

`load_dataset(source)` accepts

* ``"cifar10"``: tensorflow-datasets' copy, read with ``tfds.data_source`` (array_record, no
  TensorFlow needed to read; preparing it once needs TensorFlow and the network). When it is
  not prepared and TensorFlow is absent (or preparing fails), the official python archive is
  downloaded instead from `CIFAR10_ARCHIVE_URL` ($JAXRES_CIFAR10_URL overrides it, e.g. for a
  mirror), MD5-verified, into ``<cache folder>/downloads/`` once, and read as below.
* a path to the official CIFAR-10 python archive: ``cifar-10-python.tar.gz`` or the extracted
  ``cifar-10-batches-py/`` folder (or the folder holding it).
* an image-folder tree ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/test/<class>/*``, or a folder
  whose single subfolder is such a root.
* a ``.tar`` / ``.tar.gz`` / ``.tgz`` (also ``.tar.bz2`` / ``.tar.xz``) holding such a tree; it is
  decoded straight from the archive, never extracted to disk.
* ``"shapes"``: a synthetic dataset of coloured shapes on textured backgrounds with object masks
  (`jaxres.data.shapes.make_shapes`), for tests of training and of Grad-CAM localisation.

Every file source is decoded once and cached as an uncompressed ``.npz`` in the cache folder
(`default_cache_dir`), keyed by the source's absolute path, sizes and modification times; a
later load of the same source reads the cache (well under a second for CIFAR-10).

This module holds the dispatch, the cache and the ``cifar10`` source (tensorflow-datasets, the
download through `jaxres.data.download`), and the choice of a run's training subset; the files
themselves are read by `jaxres.data.readers`, the shapes made by `jaxres.data.shapes`, and
`Split` / `Dataset` live in `jaxres.data.containers` (all of them below this module). Users reach
its names through `jaxres.data`.

Labels of an image tree are the indices of the class folders in sorted order; images are taken
in sorted file-name order within each class, classes in label order. Hidden files and folders
(names starting with ".") and files without a PNG/JPEG extension are skipped; an image that
cannot be read or decoded (also a broken link with an image extension) is an error naming it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import pathlib
import re
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from jaxres import runtime
from jaxres.data import readers, shapes
from jaxres.data.constants import ACCEPTED_SOURCES, CIFAR10_CLASSES, SPLIT_NAMES
from jaxres.data.containers import Dataset, Split
from jaxres.data.download import download_file
from jaxres.errors import JaxresError

# The official archive where its authors publish it (torchvision and TFDS fetch the same file).
CIFAR10_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URL_VARIABLE = "JAXRES_CIFAR10_URL"  # environment variable overriding the address
DOWNLOADS_FOLDER = "downloads"  # inside the cache folder

CACHE_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Entry point


def default_cache_dir() -> pathlib.Path:
    """The folder for decoded-array caches: $JAXRES_CACHE, else ~/.cache/jaxres."""
    return runtime.cache_root()


def load_dataset(source: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Dataset:
    """Loads a whole dataset into host memory as uint8 arrays.

    `source` names a dataset ("cifar10", "shapes") or a path (the official CIFAR-10
    archive or its folder, an image-folder tree, a tar of one); the module docstring says
    what each may be. A file source is decoded once and cached as an .npz in `cache_dir`,
    keyed by its files' absolute paths, sizes and modification times, so a later load of
    the same, unchanged source only reads the cache. "shapes" is generated each time
    (`jaxres.data.shapes.make_shapes()`, deterministic).

    Args:
      source: "cifar10", "shapes", or a path (str or os.PathLike; "~" is expanded).
      cache_dir: the folder for decoded-array caches and the downloaded archive
        (default `default_cache_dir()`: $JAXRES_CACHE, else ~/.cache/jaxres).
      progress: whether to show a progress bar while decoding or downloading, when
        stderr is a terminal.

    Returns:
      A `Dataset`: train and test `Split`s of images uint8[N, H, W, 3] (RGB) and labels
      int32[N] (plus masks bool[N, H, W] for "shapes"), the class names in label order,
      and a description of the source.

    Raises:
      JaxresError: naming the culprit, for a path that does not exist or is not a
        dataset, a damaged archive, an image that cannot be decoded or has another size,
        inconsistent class folders, and for "cifar10" when neither tensorflow-datasets
        nor the download of the official archive works (saying why, and what to do).
    """
    source = os.fspath(source)
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    show_progress = progress and sys.stderr.isatty()
    if source == "shapes":
        return shapes.make_shapes()
    if source == "cifar10":
        return _load_cifar10(cache_dir, show_progress)
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise JaxresError(f"dataset source {source!r} not found: no such file or folder. Accepted: {ACCEPTED_SOURCES}")
    path = path.resolve()
    if path.is_dir():
        official_folder = readers.find_official_folder(path)
        if official_folder is not None:
            loader = functools.partial(readers.load_official_folder, official_folder)
            fingerprint = _files_fingerprint(official_folder / name for name in readers.official_file_names())
            return _cached(cache_dir, "official-" + path.name, fingerprint, loader)
        root = readers.find_tree_root(path)
        entries = readers.list_tree_entries(root)
        fingerprint = _files_fingerprint(entry.path for entry in entries)
        loader = functools.partial(readers.load_image_tree, root, entries, show_progress)
        return _cached(cache_dir, "folder-" + path.name, fingerprint, loader)
    if path.is_file() and tarfile.is_tarfile(path):
        return _load_cached_tar(path, cache_dir, show_progress)
    raise JaxresError(
        f"unrecognised dataset source {source!r} (not a folder or a tar archive). Accepted: {ACCEPTED_SOURCES}"
    )


# ----------------------------------------------------------------------------------------------
# Cache: one uncompressed .npz per source, written atomically


def _files_fingerprint(paths: Iterable[pathlib.Path | str]) -> str:
    """A hex digest of the absolute paths, sizes and modification times of `paths`."""
    digest = hashlib.sha256(f"jaxres-cache-v{CACHE_FORMAT_VERSION}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"\0{os.path.abspath(path)}\0{state}".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: pathlib.Path, label: str, fingerprint: str) -> pathlib.Path:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:60]
    return cache_dir / f"{readable}-{fingerprint[:24]}.npz"


def _cached(cache_dir: pathlib.Path, label: str, fingerprint: str, load) -> Dataset:
    """`load()`'s Dataset, read from the cache when a valid entry exists, else built and stored."""
    path = _cache_path(cache_dir, label, fingerprint)
    if path.exists():
        dataset = _read_cache(path)
        if dataset is not None:
            return dataset
    dataset = load()
    _write_cache(path, dataset)
    return dataset


def _read_cache(path: pathlib.Path) -> Dataset | None:
    """The Dataset stored at `path`, or None (with a warning) when the file is unreadable or invalid."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        class_names = tuple(str(name) for name in arrays["class_names"])
        splits = [Split(arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in SPLIT_NAMES]
        if not class_names or any(int(split.labels.max(initial=0)) >= len(class_names) for split in splits):
            raise ValueError("labels out of range of the class names")
        return Dataset(splits[0], splits[1], class_names, str(arrays["source"]))
    except Exception as err:  # noqa: BLE001 - any damage to a cache file means: rebuild it
        message = f"ignoring unreadable dataset cache {path} ({type(err).__name__}: {err}); rebuilding it"
        warnings.warn(message, stacklevel=4)
        return None


def _write_cache(path: pathlib.Path, dataset: Dataset) -> None:
    """Stores `dataset` at `path` atomically (temp file + rename); warns instead of failing on
    an OSError. On any exception (a KeyboardInterrupt too) the temporary file is removed."""
    arrays = {
        "class_names": np.asarray(dataset.class_names, dtype=str),
        "source": np.asarray(dataset.source, dtype=str),
    }
    for name, split in zip(SPLIT_NAMES, (dataset.train, dataset.test)):
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(temp_name, path)
    except BaseException as err:  # an interrupt too: never leave the temporary file behind
        if temp_name is not None:
            pathlib.Path(temp_name).unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        warnings.warn(f"could not write the dataset cache {path}: {err}; the next load decodes again", stacklevel=4)


def _load_cached_tar(path: pathlib.Path, cache_dir: pathlib.Path, show_progress: bool) -> Dataset:
    """A tar archive's Dataset through the decoded-array cache (keyed by the archive's size and mtime)."""
    loader = functools.partial(readers.load_tar, path, show_progress)
    return _cached(cache_dir, "tar-" + path.name, _files_fingerprint([path]), loader)


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets


def _tfds_data_dir() -> pathlib.Path:
    """Where tensorflow-datasets keeps prepared datasets: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return pathlib.Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _tfds_prepare_instructions(data_dir: pathlib.Path) -> str:
    return (
        "To use tensorflow-datasets instead, prepare it once (needs TensorFlow and the network):\n"
        "    pip install tensorflow importlib_resources\n"
        '    python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('cifar10', data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"\n"
        "(or just load_dataset('cifar10') again once TensorFlow is installed). Without network, use a local copy "
        "(--data PATH, or load_dataset(PATH)): path/to/cifar-10-python.tar.gz, an image folder or a .tar.gz of one "
        "(e.g. ../shared/data/cifar10-jpeg.tar.gz), "
        "or 'shapes'"
    )


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class _TfdsUnavailable(JaxresError):
    """tensorflow-datasets cannot give CIFAR-10 here (not installed, not prepared, not preparable)."""


def _tfds_cifar10_sources(data_dir: pathlib.Path) -> dict:
    """{'train': records, 'test': records} from `tfds.data_source`, preparing the dataset when
    TensorFlow is available. Raises _TfdsUnavailable saying why when it cannot."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        message = f"source 'cifar10' needs tensorflow-datasets ({err}): pip install tensorflow-datasets."
        raise _TfdsUnavailable(message) from None
    arguments = dict(data_dir=str(data_dir), builder_kwargs={"file_format": "array_record"})
    try:
        sources = tfds.data_source("cifar10", download=False, **arguments)
    except NotImplementedError as err:  # prepared, but as TFRecord: no random access
        raise _TfdsUnavailable(
            f"CIFAR-10 in {data_dir} is prepared in a format tfds.data_source cannot read ({err}). "
            "Prepare it again in array_record format (in another folder, e.g. via $TFDS_DATA_DIR)."
        ) from None
    if all(split in sources for split in SPLIT_NAMES):
        return sources
    if not _tensorflow_installed():
        raise _TfdsUnavailable(_tfds_not_prepared_reason(data_dir))
    try:
        sources = tfds.data_source("cifar10", download=True, **arguments)
    except (OSError, ImportError) as err:  # requests' ConnectionError is an OSError
        raise _TfdsUnavailable(
            f"tensorflow-datasets could not download and prepare CIFAR-10 into {data_dir} "
            f"({type(err).__name__}: {err}); is the network reachable?"
        ) from err
    return sources


def _tfds_not_prepared_reason(data_dir: pathlib.Path) -> str:
    return (
        f"CIFAR-10 is not prepared for tensorflow-datasets in {data_dir} (set $TFDS_DATA_DIR to use another "
        "folder) and TensorFlow, needed to prepare it, is not installed."
    )


def _tfds_prepared_files(data_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files under `data_dir`/cifar10, sorted (empty when nothing is prepared there)."""
    prepared_dir = data_dir / "cifar10"
    return sorted(path for path in prepared_dir.rglob("*") if path.is_file()) if prepared_dir.is_dir() else []


def cifar10_archive_url() -> str:
    """Where the `cifar10` fallback downloads the official archive: $JAXRES_CIFAR10_URL, else
    `CIFAR10_ARCHIVE_URL`. The file there must be the official one (its MD5 is checked)."""
    return os.environ.get(CIFAR10_URL_VARIABLE) or CIFAR10_ARCHIVE_URL


def _downloaded_cifar10_archive(cache_dir: pathlib.Path, show_progress: bool) -> pathlib.Path:
    """The official archive in `cache_dir`/downloads/, downloaded and MD5-verified when absent.

    A file there was verified before it was put in place (`download_file` is atomic), so an
    existing one is used as it is.
    """
    archive = cache_dir / DOWNLOADS_FOLDER / "cifar-10-python.tar.gz"
    if not archive.is_file():
        download_file(cifar10_archive_url(), archive, CIFAR10_ARCHIVE_MD5, progress=show_progress)
    return archive


def _load_cifar10(cache_dir: pathlib.Path, show_progress: bool) -> Dataset:
    """CIFAR-10 for source 'cifar10': tensorflow-datasets when it is prepared or TensorFlow can
    prepare it, else (or when that fails) the official archive, downloaded once into the cache.

    Raises JaxresError saying why neither worked, how to prepare TFDS and which local copies work.
    """
    data_dir = _tfds_data_dir()
    prepared = _tfds_prepared_files(data_dir)
    if prepared or _tensorflow_installed():
        try:
            return _load_tfds_cifar10(cache_dir, data_dir, prepared, show_progress)
        except _TfdsUnavailable as err:
            tfds_reason = str(err)
    else:  # decided without importing tensorflow_datasets, which takes seconds
        tfds_reason = _tfds_not_prepared_reason(data_dir)
    try:
        archive = _downloaded_cifar10_archive(cache_dir, show_progress)
    except JaxresError as err:
        raise JaxresError(
            f"cannot load source 'cifar10'. {tfds_reason} Falling back to the official archive failed too: {err}.\n"
            + _tfds_prepare_instructions(data_dir)
        ) from None
    return _load_cached_tar(archive, cache_dir, show_progress)


def _split_from_records(records: Sequence[dict], split: str, show_progress: bool) -> Split:
    """Reads a whole tfds split (records: dicts with 'image' uint8[H, W, 3], 'label') into a Split."""
    from tqdm import tqdm

    count = len(records)
    if count == 0:
        raise JaxresError(f"tensorflow-datasets cifar10 split {split!r} is empty")
    images, labels = None, np.empty(count, np.int32)
    batch_size = 1000
    with tqdm(total=count, unit="img", desc=f"reading cifar10 {split}", disable=not show_progress) as bar:
        for start in range(0, count, batch_size):
            keys = list(range(start, min(start + batch_size, count)))
            batch = records.__getitems__(keys) if hasattr(records, "__getitems__") else [records[i] for i in keys]
            for index, record in zip(keys, batch):
                image = np.asarray(record["image"], np.uint8)
                if images is None:
                    images = np.empty((count, *image.shape), np.uint8)
                images[index] = image
                labels[index] = int(record["label"])
            bar.update(len(keys))
    return Split(images, labels)


def _load_tfds_cifar10(
    cache_dir: pathlib.Path, data_dir: pathlib.Path, prepared: Sequence[pathlib.Path], show_progress: bool
) -> Dataset:
    """CIFAR-10 through tensorflow-datasets in `data_dir` (`prepared`: its files); the cache key
    covers the prepared files, so a cache hit needs no tfds import."""

    def read() -> Dataset:
        sources = _tfds_cifar10_sources(data_dir)
        train, test = (_split_from_records(sources[split], split, show_progress) for split in SPLIT_NAMES)
        return Dataset(train, test, CIFAR10_CLASSES, f"tensorflow-datasets cifar10 in {data_dir}")

    return _cached(cache_dir, "tfds-cifar10", _files_fingerprint([data_dir / "cifar10", *prepared]), read)


def check_train_subset(subset: int | None, count: int) -> None:
    """Raise JaxresError when a run's `train_subset` asks for more than the `count` images of
    the training set (config.json would record a number of images the run never saw)."""
    if subset is not None and subset > count:
        raise JaxresError(
            f"train_subset {subset} is larger than the training set ({count} images): "
            f"use at most {count}, or leave it out to train on all of them"
        )


def select_train_subset(labels: np.ndarray, subset: int | None, seed: int) -> np.ndarray:
    """Indices of the training images to use: all, or `subset` of them drawn with `seed` (sorted).

    labels: int[N] -> int[min(subset, N)]. NumPy only: the PyTorch side of the benchmarks
    draws the same images with it.
    """
    n = labels.shape[0]
    if subset is None or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])
