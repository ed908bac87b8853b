"""Readers of the file sources: image-folder trees (on disk or inside a tar), the official
CIFAR-10 python pickles, and the image decoding they share (a pool of forked workers for
large sources).

`jaxres.data.sources.load_dataset` picks the reader for a path and caches what it returns; each
reader here only turns files into a `Dataset` of uint8 arrays and knows nothing of the cache:

    find_official_folder(path)       the official batch files' folder under `path`, or None
    load_official_folder(folder)     Dataset from data_batch_1..5, test_batch, batches.meta
    find_tree_root(path)             ROOT holding ROOT/train/<class>/ and ROOT/test/<class>/
    list_tree_entries(root)          its images (and class folders) in sorted order
    load_image_tree(root, entries)   Dataset, decoding the listed images
    load_tar(path)                   Dataset from a tar of either kind, read from memory

Labels of a tree are the indices of the class folders in sorted order; images are taken in
sorted file-name order within each class. Errors in the data raise JaxresError naming the
file. Imports `jaxres.data.constants` and `jaxres.data.containers` only, never the sources.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import functools
import gzip
import importlib
import importlib.util
import io
import itertools
import lzma
import multiprocessing
import os
import pathlib
import pickle
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from jaxres.data.constants import ACCEPTED_SOURCES, SPLIT_NAMES
from jaxres.data.containers import Dataset, Split
from jaxres.errors import JaxresError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
OFFICIAL_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST_FILE = "test_batch"
OFFICIAL_META_FILE = "batches.meta"
OFFICIAL_FOLDER = "cifar-10-batches-py"

DECODE_CHUNK_SIZE = 500  # images per task sent to a decoding worker
MIN_IMAGES_FOR_WORKERS = 4000  # below this, a worker pool costs more than it saves
MIN_ARCHIVE_BYTES_FOR_WORKERS = 4 << 20  # the same for tar archives, whose image count comes late
MAX_DECODE_WORKERS = 8


# ----------------------------------------------------------------------------------------------
# Image decoding (in a pool of forked workers for large sources)


# Where an image's bytes are: a file path, or (offset, size) into the uncompressed archive bytes.
ImageLocation = str | tuple[int, int]


def _decode_image(name: str, encoded: bytes | str) -> np.ndarray:
    """Decodes one PNG/JPEG (`encoded`: its bytes or a file path) to uint8[H, W, 3] RGB.

    Grayscale (also 16-bit), palette, RGBA, CMYK... are converted to RGB (alpha is dropped).
    Raises JaxresError naming `name` when the image cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded) as image:
            if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit grayscale PNG: keep the top 8 bits
                gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise JaxresError(f"cannot decode image {name}: {err}") from None


def _decode_image_chunk(
    chunk: Sequence[tuple[str, ImageLocation]], archive_bytes: bytes | None
) -> np.ndarray | list[np.ndarray]:
    """Decodes (name, location) pairs: uint8[n, H, W, 3] when all have one size, else a list of
    uint8[H, W, 3] (so the caller can name the odd one)."""
    images = []
    for name, location in chunk:
        if isinstance(location, tuple):
            offset, size = location
            images.append(_decode_image(name, archive_bytes[offset : offset + size]))
        else:
            images.append(_decode_image(name, location))
    return np.stack(images) if len({image.shape for image in images}) == 1 else images


# Decoding workers are forked: each inherits the archive bytes (copy-on-write) through the pool
# initializer, which parks them here, so tasks carry only offsets. Set in worker processes only.
_worker_archive_bytes: bytes | None = None


def _set_worker_archive_bytes(archive_bytes: bytes | None) -> None:
    global _worker_archive_bytes
    _worker_archive_bytes = archive_bytes


def _decode_image_chunk_in_worker(chunk: Sequence[tuple[str, ImageLocation]]) -> np.ndarray | list[np.ndarray]:
    return _decode_image_chunk(chunk, _worker_archive_bytes)


def _fork_is_safe() -> bool:
    """Whether worker processes may be forked: fork exists and this process has not imported jax.

    A forked child keeps only the thread that forked, so a lock another thread holds at that
    moment is never released in the child; JAX's runtime is multithreaded (JAX warns that
    forking it may deadlock). Its runtime cannot run before jax is imported, and JAX has no
    public way to ask whether it has started since (jax-ml/jax#23320), so a process that has
    imported jax decodes in one process; spawned workers would re-import the user's main script.
    """
    return "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules


def _default_decode_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_DECODE_WORKERS))


def _decode_images(
    named_locations: Iterable[tuple[str, ImageLocation]],
    *,
    archive_bytes: bytes | None = None,
    expected_count: int | None,
    show_progress: bool,
    workers: int | None = None,
) -> np.ndarray:
    """Decodes images into uint8[N, H, W, 3], in input order.

    named_locations: (name for messages, file path or (offset, size) into `archive_bytes`).
    workers: None picks one per CPU (at most MAX_DECODE_WORKERS) for large inputs when forking is
    safe (`_fork_is_safe`), else 1. With several workers, chunks are decoded in forked processes
    while `named_locations` is still being produced (e.g. parsed from a tar). Raises JaxresError
    naming the file for an undecodable image or one whose size differs from the first image's.
    """
    from tqdm import tqdm

    if workers is None:
        small = expected_count is not None and expected_count < MIN_IMAGES_FOR_WORKERS
        workers = 1 if small or not _fork_is_safe() else _default_decode_workers()
    name_chunks: list[list[str]] = []

    def chunks() -> Iterator[list[tuple[str, ImageLocation]]]:
        iterator = iter(named_locations)
        while chunk := list(itertools.islice(iterator, DECODE_CHUNK_SIZE)):
            name_chunks.append([name for name, _ in chunk])
            yield chunk

    decoded: list[np.ndarray | list[np.ndarray]] = []
    with contextlib.ExitStack() as stack:
        if workers > 1:  # forked before the progress bar starts its monitor thread
            pool = multiprocessing.get_context("fork").Pool(workers, _set_worker_archive_bytes, (archive_bytes,))
            stack.enter_context(pool)
            results = pool.imap(_decode_image_chunk_in_worker, chunks())
        else:
            results = (_decode_image_chunk(chunk, archive_bytes) for chunk in chunks())
        bar = stack.enter_context(
            tqdm(total=expected_count, unit="img", desc="decoding images", disable=not show_progress)
        )
        for images in results:
            decoded.append(images)
            bar.update(len(images))
    if not decoded:
        return np.zeros((0, 0, 0, 3), np.uint8)
    first_name, reference_shape = name_chunks[0][0], decoded[0][0].shape
    for names, images in zip(name_chunks, decoded):
        for name, image in zip(names, images) if isinstance(images, list) else [(names[0], images[0])]:
            if image.shape != reference_shape:
                raise JaxresError(
                    f"image {name} is {image.shape[1]}x{image.shape[0]} pixels but {first_name} is "
                    f"{reference_shape[1]}x{reference_shape[0]}: all images of a dataset must have one size"
                )
    return np.concatenate(decoded)


# ----------------------------------------------------------------------------------------------
# Image-folder trees: ROOT/{train,test}/<class>/<image>, on disk or inside a tar


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    """One image of a tree: its split, class folder and file name, and its `path`: the file's
    path (folders) or the member's name (archives)."""

    split: str
    class_name: str
    file_name: str
    path: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(name)


def _assemble_tree(
    entries: Sequence[TreeEntry],
    images: np.ndarray,
    class_folders: dict[str, set[str]],
    where: str,
    source: str,
) -> Dataset:
    """Builds the Dataset from decoded tree images (uint8[N, H, W, 3], aligned with `entries`).

    class_folders: split -> every class folder seen (also empty ones). Class names are the
    sorted train folders; test must have the same. Raises JaxresError naming what is wrong.
    """
    for split in SPLIT_NAMES:
        if not class_folders.get(split):
            raise JaxresError(
                f"{where} has no {split}/<class>/ folders with images (expected {split}/<class>/*.png|jpg)"
            )
    train_classes, test_classes = set(class_folders["train"]), set(class_folders["test"])
    if train_classes != test_classes:
        raise JaxresError(
            f"{where}: train and test have different class folders; only in train: "
            f"{sorted(train_classes - test_classes)}, only in test: {sorted(test_classes - train_classes)}"
        )
    class_names = tuple(sorted(train_classes))
    counts = {(entry.split, entry.class_name) for entry in entries}
    for split in SPLIT_NAMES:
        for class_name in class_names:
            if (split, class_name) not in counts:
                raise JaxresError(f"class folder {split}/{class_name} in {where} has no PNG or JPEG images")
    label_of = {name: label for label, name in enumerate(class_names)}
    splits = []
    for split in SPLIT_NAMES:
        indices = [i for i, entry in enumerate(entries) if entry.split == split]
        indices.sort(key=lambda i: (label_of[entries[i].class_name], entries[i].file_name))
        labels = np.asarray([label_of[entries[i].class_name] for i in indices], np.int32)
        splits.append(Split(images[np.asarray(indices, np.int64)], labels))
    return Dataset(splits[0], splits[1], class_names, source)


def _has_splits(folder: pathlib.Path) -> bool:
    return all((folder / split).is_dir() for split in SPLIT_NAMES)


def find_tree_root(path: pathlib.Path) -> pathlib.Path:
    """`path` if it holds train/ and test/, else its single subfolder that does; JaxresError
    naming `path` (and what is accepted) when neither does."""
    if _has_splits(path):
        return path
    subfolders = [child for child in path.iterdir() if child.is_dir() and not _is_hidden(child.name)]
    if len(subfolders) == 1 and _has_splits(subfolders[0]):
        return subfolders[0]
    raise JaxresError(
        f"folder {path} is not a dataset: expected {path}/train/<class>/*.png|jpg and {path}/test/<class>/*, "
        f"the same one level down, or the official {OFFICIAL_FOLDER} files. Accepted: {ACCEPTED_SOURCES}"
    )


def list_tree_entries(root: pathlib.Path) -> list[TreeEntry]:
    """The images under root/{train,test}/<class>/, in sorted order.

    Every class folder also appears once as an entry with file_name '' and the folder's path,
    so that empty folders are noticed and folder changes alter the cache key.
    """
    entries = []
    for split in SPLIT_NAMES:
        for class_dir in sorted((root / split).iterdir()):
            if _is_hidden(class_dir.name):
                continue
            if not class_dir.is_dir():
                if _is_image_name(class_dir.name):
                    raise JaxresError(
                        f"image {class_dir} is not inside a class folder: expected {split}/<class>/{class_dir.name}"
                    )
                continue
            entries.append(TreeEntry(split, class_dir.name, "", str(class_dir)))
            for file in sorted(class_dir.iterdir()):
                if _is_image_name(file.name) and _is_image_file(file):
                    entries.append(TreeEntry(split, class_dir.name, file.name, str(file)))
    return entries


def _is_image_file(path: pathlib.Path) -> bool:
    """Whether `path` is a file (or a link to one) to decode, not a folder; JaxresError naming
    it when it cannot be followed (a broken link, a loop of links) or its folder not searched."""
    try:
        os.stat(path)
    except OSError as error:
        raise JaxresError(f"cannot read image {path}: {error.strerror or error}") from None
    return path.is_file()


def load_image_tree(root: pathlib.Path, listed: Sequence[TreeEntry], show_progress: bool) -> Dataset:
    """Decodes the images of an image-folder tree listed by `list_tree_entries`.

    show_progress: a progress bar while decoding. Returns the Dataset (uint8[N, H, W, 3]
    images, int32[N] labels); JaxresError naming the image or folder that is wrong (not
    decodable, another size, a class folder empty or missing from one split).
    """
    class_folders: dict[str, set[str]] = {split: set() for split in SPLIT_NAMES}
    for entry in listed:
        class_folders[entry.split].add(entry.class_name)
    entries = [entry for entry in listed if entry.file_name]
    images = _decode_images(
        ((entry.path, entry.path) for entry in entries), expected_count=len(entries), show_progress=show_progress
    )
    return _assemble_tree(entries, images, class_folders, f"image folder {root}", f"image folders at {root}")


def _read_archive_bytes(path: pathlib.Path) -> bytes:
    """The uncompressed bytes of a tar archive (plain, gzip, bzip2 or xz); JaxresError if damaged."""
    with open(path, "rb") as file:
        magic = file.read(6)
    openers = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
    opener = next((open_ for prefix, open_ in openers.items() if magic.startswith(prefix)), open)
    try:
        with opener(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise JaxresError(f"cannot read archive {path}: {err}") from None


def _tar_file_members(archive: tarfile.TarFile, path: pathlib.Path) -> Iterator[tarfile.TarInfo]:
    """The regular-file and folder members of `archive`, lazily, in archive order."""
    try:
        for member in archive:
            if member.isdir() or (member.isreg() and not member.issparse()):
                yield member
    except tarfile.TarError as err:
        raise JaxresError(f"cannot read archive {path}: {err}") from None


def _member_parts(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split("/") if part not in ("", "."))


def load_tar(path: pathlib.Path, show_progress: bool) -> Dataset:
    """Loads a tar archive holding an image tree or the official CIFAR-10 python batches.

    The archive (plain, gzip, bzip2 or xz) is read into memory and decoded from there, never
    extracted. show_progress: a progress bar while decoding. JaxresError naming the archive,
    or the member, when it is damaged or not laid out as a dataset.
    """
    contents = _read_archive_bytes(path)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(contents), mode="r:")
    except tarfile.TarError as err:
        raise JaxresError(f"cannot read archive {path}: {err}") from None
    with archive:
        members = _tar_file_members(archive, path)
        head = []
        for member in members:
            head.append(member)
            if member.isreg():
                break
        members = itertools.chain(head, members)
        if head and head[-1].isreg() and _is_official_member(head[-1].name):
            return _load_official_tar(path, contents, members)
        return _load_tar_tree(path, contents, members, show_progress)


def _load_tar_tree(
    path: pathlib.Path, contents: bytes, members: Iterable[tarfile.TarInfo], show_progress: bool
) -> Dataset:
    """Decodes the image tree in a tar, straight from its (uncompressed) bytes `contents`.

    The root is the archive's top level or its single top-level folder. Members are classified
    while the workers decode earlier ones; problems are raised after decoding.
    """
    entries: list[TreeEntry] = []
    class_folders: dict[str, set[str]] = {split: set() for split in SPLIT_NAMES}
    roots: set[str] = set()
    misplaced: list[str] = []
    seen: set[tuple[str, ...]] = set()
    duplicates: list[str] = []

    def images_in_splits() -> Iterator[tuple[str, tuple[int, int]]]:
        for member in members:
            parts = _member_parts(member.name)
            if any(_is_hidden(part) for part in parts):
                continue
            depth = 0 if parts[:1] and parts[0] in SPLIT_NAMES else 1
            relative = parts[depth:]
            if not relative or relative[0] not in SPLIT_NAMES:
                continue
            roots.add("/".join(parts[:depth]))
            if member.isdir():
                if len(relative) == 2:
                    class_folders[relative[0]].add(relative[1])
                continue
            if not _is_image_name(relative[-1]):
                continue
            if len(relative) != 3:
                misplaced.append(member.name)
                continue
            if parts in seen:  # extracting keeps one copy: counting both would train on it twice
                duplicates.append(member.name)
                continue
            seen.add(parts)
            class_folders[relative[0]].add(relative[1])
            entries.append(TreeEntry(relative[0], relative[1], relative[2], member.name))
            yield member.name, (member.offset_data, member.size)

    workers = 1 if len(contents) < MIN_ARCHIVE_BYTES_FOR_WORKERS else None
    images = _decode_images(
        images_in_splits(), archive_bytes=contents, expected_count=None, show_progress=show_progress, workers=workers
    )
    where = f"archive {path}"
    if len(roots) > 1:
        raise JaxresError(f"{where} holds several dataset roots: {sorted(root + '/' for root in roots)}; keep one")
    if misplaced:
        raise JaxresError(
            f"image {misplaced[0]} in {where} is not directly inside a class folder: expected <split>/<class>/<image>"
        )
    if duplicates:
        raise JaxresError(
            f"{where} holds {duplicates[0]} more than once ({len(duplicates)} duplicate member name(s)): extracting "
            "it keeps only the last copy; rebuild the archive with each image once"
        )
    return _assemble_tree(entries, images, class_folders, where, f"image folders in {path}")


# ----------------------------------------------------------------------------------------------
# The official CIFAR-10 python archive: pickled batches


def official_file_names() -> tuple[str, ...]:
    """The official batch files: data_batch_1..5, test_batch, batches.meta."""
    return (*OFFICIAL_TRAIN_FILES, OFFICIAL_TEST_FILE, OFFICIAL_META_FILE)


def _is_official_member(name: str) -> bool:
    """Whether a tar member belongs to the official archive (cifar-10-batches-py/...)."""
    parts = _member_parts(name)
    return parts[-1] in official_file_names() or (len(parts) > 1 and parts[-2] == OFFICIAL_FOLDER)


def find_official_folder(path: pathlib.Path) -> pathlib.Path | None:
    """`path` or `path/cifar-10-batches-py` when it holds the official batch files, else None."""
    for folder in (path, path / OFFICIAL_FOLDER):
        if (folder / OFFICIAL_META_FILE).is_file() and (folder / OFFICIAL_TEST_FILE).is_file():
            return folder
    return None


@functools.cache
def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 batch pickle needs (numpy arrays and dtypes, bytes)."""
    import codecs

    core = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"
    multiarray = importlib.import_module(f"{core}.multiarray")
    numeric = importlib.import_module(f"{core}.numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and plain containers: loading a downloaded
    archive must not run arbitrary code."""

    def find_class(self, module: str, name: str):
        allowed = _numpy_pickle_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return allowed[(module, name)]


def _unpickle_batch(data: bytes, name: str) -> dict:
    """The dict in one official batch file (keys decoded to str); JaxresError naming `name` if corrupt."""
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - pickle raises many types on damaged data
        raise JaxresError(f"cannot read CIFAR-10 batch {name}: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict):
        raise JaxresError(f"cannot read CIFAR-10 batch {name}: expected a dict, found {type(batch).__name__}")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _official_split(batches: Sequence[tuple[str, dict]], num_classes: int) -> Split:
    """Concatenates official batches (b'data' uint8[n, 3072] in CHW order, b'labels') into a Split."""
    images, labels = [], []
    for name, batch in batches:
        try:
            data = np.asarray(batch["data"])
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise JaxresError(f"CIFAR-10 batch {name} lacks valid 'data' and 'labels': {err}") from None
        well_formed = data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32
        if not well_formed or batch_labels.shape != data.shape[:1]:
            raise JaxresError(
                f"CIFAR-10 batch {name} has data {data.dtype}{list(data.shape)} and {batch_labels.size} labels; "
                "expected uint8[N, 3072] and N labels"
            )
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise JaxresError(f"CIFAR-10 batch {name} has labels outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int32))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def _official_dataset(read_file, source: str) -> Dataset:
    """Builds the Dataset from the official batch files; read_file(file_name) -> (bytes, display name)."""
    meta_bytes, meta_name = read_file(OFFICIAL_META_FILE)
    label_names = _unpickle_batch(meta_bytes, meta_name).get("label_names")
    if not isinstance(label_names, list) or not label_names:
        raise JaxresError(f"CIFAR-10 batch {meta_name} has no 'label_names' list")
    class_names = tuple(name.decode() if isinstance(name, bytes) else str(name) for name in label_names)
    splits = []
    for file_names in (OFFICIAL_TRAIN_FILES, (OFFICIAL_TEST_FILE,)):
        batches = []
        for file_name in file_names:
            data, name = read_file(file_name)
            batches.append((name, _unpickle_batch(data, name)))
        splits.append(_official_split(batches, len(class_names)))
    return Dataset(splits[0], splits[1], class_names, source)


def load_official_folder(folder: pathlib.Path) -> Dataset:
    """The Dataset of the official batch files in `folder`; JaxresError naming a missing or
    damaged file."""

    def read_file(file_name: str) -> tuple[bytes, str]:
        path = folder / file_name
        if not path.is_file():
            raise JaxresError(f"official CIFAR-10 folder {folder} lacks {file_name}")
        return path.read_bytes(), str(path)

    return _official_dataset(read_file, f"official CIFAR-10 python batches in {folder}")


def _load_official_tar(path: pathlib.Path, contents: bytes, members: Iterable[tarfile.TarInfo]) -> Dataset:
    by_name = {_member_parts(member.name)[-1]: member for member in members if member.isreg()}

    def read_file(file_name: str) -> tuple[bytes, str]:
        member = by_name.get(file_name)
        if member is None:
            raise JaxresError(f"official CIFAR-10 archive {path} lacks {OFFICIAL_FOLDER}/{file_name}")
        return contents[member.offset_data : member.offset_data + member.size], f"{member.name} in {path}"

    return _official_dataset(read_file, f"official CIFAR-10 python archive {path}")
