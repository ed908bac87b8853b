"""Tests of jaxres.data and its parts (jaxres.data.sources, .readers, .shapes, .containers, .constants):
every source on small fixtures written here, the cache, the errors, the synthetic shapes,
and one load of the real CIFAR-10 copy (slow)."""

import io
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxres import data
from jaxres.data import readers, sources
from jaxres.data import CIFAR10_CLASSES, Dataset, Split, load_dataset
from jaxres.errors import JaxresError
from jaxres.data.shapes import SHAPES_CLASSES, make_shapes
from tests.helpers import (
    REPO,
    check_official_dataset,
    decode_in_fresh_python,
    files_under,
    official_batches,
    unused_loopback_url,
    write_official_folder,
    write_official_tar,
    write_tar,
)

# ----------------------------------------------------------------------------------------------
# Fixture writers


def random_image(seed: int, size: int = 8) -> np.ndarray:
    """uint8[size, size, 3] noise, a different one per seed."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def smooth_image(seed: int, size: int = 8) -> np.ndarray:
    """uint8[size, size, 3] of one flat colour per seed: survives JPEG almost unchanged."""
    colour = np.random.default_rng(seed).integers(40, 216, 3, dtype=np.uint8)
    return np.broadcast_to(colour, (size, size, 3)).copy()


# One tree: class -> file name -> (pixels uint8[8, 8, 3] as expected after decoding, writer).
# PNGs must decode exactly; JPEGs approximately. Names are out of order on purpose.
def tree_layout() -> dict[str, dict[str, dict[str, np.ndarray]]]:
    return {
        "train": {
            "dog": {"b.png": random_image(1), "a.PNG": random_image(2), "c.jpg": smooth_image(3)},
            "cat": {"z.jpeg": smooth_image(4), "y.png": random_image(5)},
            "emu": {"e.JPG": smooth_image(6), "gray.png": np.repeat(random_image(7)[..., :1], 3, axis=-1)},
        },
        "test": {
            "cat": {"t1.png": random_image(8)},
            "dog": {"t2.png": random_image(9)},
            "emu": {"rgba.png": random_image(10)},
        },
    }


def encode_image(name: str, pixels: np.ndarray) -> bytes:
    """PNG or JPEG bytes for `pixels` by the file name; 'gray*' as mode L, 'rgba*' with alpha."""
    if name.startswith("gray"):
        image = Image.fromarray(pixels[..., 0], mode="L")
    elif name.startswith("rgba"):
        alpha = np.full(pixels.shape[:2] + (1,), 100, np.uint8)
        image = Image.fromarray(np.concatenate([pixels, alpha], axis=-1), mode="RGBA")
    else:
        image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if name.lower().endswith(".png") else "JPEG", quality=95)
    return buffer.getvalue()


def write_tree(root: Path, layout=None) -> Path:
    """Writes ROOT/<split>/<class>/<file> and a few files that must be ignored; returns root."""
    for split, classes in (layout or tree_layout()).items():
        for class_name, files in classes.items():
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for name, pixels in files.items():
                (root / split / class_name / name).write_bytes(encode_image(name, pixels))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"garbage, but hidden")
    (root / "README.md").write_text("ignored")
    return root


def expected_split(split: str, layout=None) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """(images uint8[N, 8, 8, 3], labels int32[N], is_png[N]) in the order load_dataset must give."""
    classes = (layout or tree_layout())[split]
    images, labels, is_png = [], [], []
    for label, class_name in enumerate(sorted(classes)):
        for name in sorted(classes[class_name]):
            images.append(classes[class_name][name])
            labels.append(label)
            is_png.append(name.lower().endswith(".png"))
    return np.stack(images), np.asarray(labels, np.int32), is_png


def tree_tar_entries(prefix: str, layout=None) -> list[tuple[str, bytes | None]]:
    """Tar entries of a tree under `prefix` ('' or 'name/'), test split first and files reversed,
    so that the loader has to sort them."""
    entries = [(f"{prefix}README.md", b"ignored")]
    for split, classes in reversed(list((layout or tree_layout()).items())):
        for class_name, files in classes.items():
            entries.append((f"{prefix}{split}/{class_name}/", None))
            for name in sorted(files, reverse=True):
                entries.append((f"{prefix}{split}/{class_name}/{name}", encode_image(name, files[name])))
    return entries


def check_tree_dataset(dataset: Dataset) -> None:
    assert dataset.class_names == ("cat", "dog", "emu")
    for split_name in ("train", "test"):
        split = getattr(dataset, split_name)
        images, labels, is_png = expected_split(split_name)
        assert split.images.dtype == np.uint8 and split.images.shape == images.shape
        assert split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.labels, labels)
        for got, want, png in zip(split.images, images, is_png):
            if png:
                np.testing.assert_array_equal(got, want)
            else:
                assert np.abs(got.astype(int) - want).max() <= 3
        assert split.masks is None


def python2_batch_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 pickled the real archive: str (not bytes) opcodes and
    numpy.core.multiarray._reconstruct. images: uint8[N, 3072] with N < 65536."""

    def string(raw: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING, Python 2's str
        return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw

    rows, columns = images.shape
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
    array += b"(K\x01M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", columns) + b"\x86"
    array += b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
    array += b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array += b"\x89" + string(images.tobytes()) + b"tb"
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


# ----------------------------------------------------------------------------------------------
# Image folders and tar archives of them


def test_image_folder_tree(tmp_path):
    root = write_tree(tmp_path / "tree")
    dataset = load_dataset(root, cache_dir=tmp_path / "cache", progress=False)
    check_tree_dataset(dataset)
    assert str(root) in dataset.source


def test_image_folder_root_one_level_down(tmp_path):
    write_tree(tmp_path / "outer" / "cifar-like")
    check_tree_dataset(load_dataset(tmp_path / "outer", cache_dir=tmp_path / "cache", progress=False))


@pytest.mark.parametrize(
    "file_name, mode, prefix",
    [
        ("tree.tar.gz", "w:gz", "cifar10-jpeg/"),
        ("tree.tgz", "w:gz", "./"),
        ("tree.tar", "w", ""),
        ("tree.tar.xz", "w:xz", ""),
    ],
)
def test_tar_of_image_tree(tmp_path, file_name, mode, prefix):
    archive = write_tar(tmp_path / file_name, tree_tar_entries(prefix), mode)
    dataset = load_dataset(archive, cache_dir=tmp_path / "cache", progress=False)
    check_tree_dataset(dataset)
    assert str(archive) in dataset.source


def test_tar_without_folder_members(tmp_path):
    entries = [(name, payload) for name, payload in tree_tar_entries("root/") if payload is not None]
    archive = write_tar(tmp_path / "t.tar.gz", entries)
    check_tree_dataset(load_dataset(archive, cache_dir=tmp_path / "cache", progress=False))


# ----------------------------------------------------------------------------------------------
# The official python archive


def test_official_folder_and_parent(tmp_path):
    batches = official_batches()
    folder = write_official_folder(tmp_path / "cifar-10-batches-py", batches)
    check_official_dataset(load_dataset(folder, cache_dir=tmp_path / "c1", progress=False), batches)
    check_official_dataset(load_dataset(tmp_path, cache_dir=tmp_path / "c2", progress=False), batches)


def test_official_tar_gz(tmp_path):
    batches = official_batches()
    archive = write_official_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    dataset = load_dataset(archive, cache_dir=tmp_path / "cache", progress=False)
    check_official_dataset(dataset, batches)
    assert "official" in dataset.source


def test_official_python2_pickles(tmp_path):
    """The real archive was pickled by Python 2 with numpy.core paths; those must load too."""
    batches = official_batches()
    folder = write_official_folder(tmp_path / "cifar-10-batches-py", batches)
    for name, batch in batches.items():
        if name != "batches.meta":
            (folder / name).write_bytes(python2_batch_pickle(batch[b"data"], batch[b"labels"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from importing numpy.core
        check_official_dataset(load_dataset(folder, cache_dir=tmp_path / "cache", progress=False), batches)


def test_official_pickle_may_not_run_code(tmp_path):
    batches = official_batches()
    folder = write_official_folder(tmp_path / "cifar-10-batches-py", batches)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(JaxresError, match=r"data_batch_2.*refusing to load (posix|nt)\.system"):
        load_dataset(folder, cache_dir=tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets (offline: only the error paths and the record conversion)


def assert_names_tfds_and_download_failure(message: str, tfds_dir: Path, url: str) -> None:
    """The 'cifar10' error must say how to prepare TFDS, that the fallback download failed and
    why, and which local copies work instead."""
    assert str(tfds_dir) in message and "pip install tensorflow" in message
    assert "file_format='array_record'" in message
    assert f"download of {url} failed: " in message and "Connection refused" in message
    assert "--data PATH" in message and "path/to/cifar-10-python.tar.gz" in message
    assert "cifar10-jpeg.tar.gz" in message and "'shapes'" in message


def test_tfds_not_prepared_without_tensorflow(tmp_path, monkeypatch):
    """Not prepared, no TensorFlow: the official archive is tried; when its server is down, the
    error names both ways."""
    url = unused_loopback_url()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAXRES_CIFAR10_URL", url)
    monkeypatch.setattr(sources, "_tensorflow_installed", lambda: False)
    with pytest.raises(JaxresError) as error:
        load_dataset("cifar10", cache_dir=tmp_path / "cache", progress=False)
    message = str(error.value)
    assert f"CIFAR-10 is not prepared for tensorflow-datasets in {tmp_path / 'tfds'}" in message
    assert_names_tfds_and_download_failure(message, tmp_path / "tfds", url)
    assert files_under(tmp_path / "cache") == []


def test_tfds_download_failure_is_clear(tmp_path, monkeypatch):
    """TensorFlow present but tfds cannot download: the official archive is tried next."""
    tfds = pytest.importorskip("tensorflow_datasets")
    url = unused_loopback_url()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAXRES_CIFAR10_URL", url)
    monkeypatch.setattr(sources, "_tensorflow_installed", lambda: True)

    def offline_data_source(name, *, download, **kwargs):
        if download:
            raise ConnectionError("Failed to resolve www.cs.toronto.edu")
        return {}

    monkeypatch.setattr(tfds, "data_source", offline_data_source)
    with pytest.raises(JaxresError) as error:
        load_dataset("cifar10", cache_dir=tmp_path / "cache", progress=False)
    message = str(error.value)
    assert "could not download and prepare CIFAR-10" in message and "Failed to resolve www.cs.toronto.edu" in message
    assert "is the network reachable?" in message
    assert_names_tfds_and_download_failure(message, tmp_path / "tfds", url)


def test_tfds_records_to_arrays(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    records = [{"id": f"train_{i:05d}", "image": images[i], "label": np.int64(i % 10)} for i in range(5)]
    calls = []

    def fake_data_source(name, *, download, data_dir, builder_kwargs):
        calls.append((name, download, data_dir, builder_kwargs))
        return {"train": records, "test": records[:2]}

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    prepared = tmp_path / "tfds" / "cifar10" / "3.0.2"  # the fake stands for a prepared copy: its files exist
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    dataset = load_dataset("cifar10", cache_dir=tmp_path / "cache", progress=False)
    assert calls == [("cifar10", False, str(tmp_path / "tfds"), {"file_format": "array_record"})]
    np.testing.assert_array_equal(dataset.train.images, images)
    np.testing.assert_array_equal(dataset.train.labels, np.arange(5) % 10)
    assert dataset.test.images.shape == (2, 32, 32, 3) and dataset.class_names == CIFAR10_CLASSES
    monkeypatch.setattr(tfds, "data_source", None)  # a cache hit must not need tfds
    np.testing.assert_array_equal(load_dataset("cifar10", cache_dir=tmp_path / "cache").train.images, images)


# ----------------------------------------------------------------------------------------------
# Cache


def forbid(monkeypatch, *names):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    for name in names:
        monkeypatch.setattr(readers, name, fail)


@pytest.mark.parametrize("kind", ["folder", "tar", "official"])
def test_second_load_reads_the_cache(tmp_path, monkeypatch, kind):
    if kind == "official":
        source = write_official_folder(tmp_path / "cifar-10-batches-py", official_batches())
    elif kind == "tar":
        source = write_tar(tmp_path / "tree.tar.gz", tree_tar_entries("root/"))
    else:
        source = write_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    first = load_dataset(source, cache_dir=cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.npz"))) == 1 and not list(cache_dir.glob("*.tmp"))
    forbid(monkeypatch, "_decode_images", "_unpickle_batch")
    second = load_dataset(source, cache_dir=cache_dir, progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(first, split).images, getattr(second, split).images)
        np.testing.assert_array_equal(getattr(first, split).labels, getattr(second, split).labels)
    assert (first.class_names, first.source) == (second.class_names, second.source)


def test_cache_is_rebuilt_when_the_source_changes(tmp_path):
    root = write_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    load_dataset(root, cache_dir=cache_dir, progress=False)
    new_pixels = random_image(99)
    (root / "test" / "cat" / "t1.png").write_bytes(encode_image("t1.png", new_pixels))
    os.utime(root / "test" / "cat" / "t1.png", ns=(1, 1))  # a different mtime even on coarse clocks
    dataset = load_dataset(root, cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(dataset.test.images[0], new_pixels)


@pytest.mark.parametrize("damage", [b"", b"not a zip file at all", "truncate", "wrong arrays"])
def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, damage):
    root = write_tree(tmp_path / "tree")
    cache_dir = tmp_path / "cache"
    load_dataset(root, cache_dir=cache_dir, progress=False)
    (cache_file,) = cache_dir.glob("*.npz")
    if damage == "truncate":
        cache_file.write_bytes(cache_file.read_bytes()[:300])
    elif damage == "wrong arrays":
        np.savez(cache_file, train_images=np.zeros((2, 3), np.float32))
    else:
        cache_file.write_bytes(damage)
    with pytest.warns(UserWarning, match="ignoring unreadable dataset cache"):
        dataset = load_dataset(root, cache_dir=cache_dir, progress=False)
    check_tree_dataset(dataset)
    check_tree_dataset(load_dataset(root, cache_dir=cache_dir, progress=False))  # rewritten and valid


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        check_tree_dataset(load_dataset(write_tree(tmp_path / "tree"), cache_dir=blocker, progress=False))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRES_CACHE", str(tmp_path / "here"))
    assert data.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("JAXRES_CACHE")
    assert data.default_cache_dir() == Path("~/.cache/jaxres").expanduser()


# ----------------------------------------------------------------------------------------------
# Mistakes a user can make: each raises JaxresError naming the culprit


def load(source, tmp_path):
    return load_dataset(source, cache_dir=tmp_path / "cache", progress=False)


def test_missing_path(tmp_path):
    with pytest.raises(JaxresError, match=r"no-such-dir.*not found.*Accepted: 'cifar10'"):
        load(tmp_path / "no-such-dir", tmp_path)


def test_unrecognised_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(JaxresError, match=r"unrecognised dataset source .*weights\.bin.*Accepted"):
        load(tmp_path / "weights.bin", tmp_path)


def test_folder_without_splits(tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    with pytest.raises(JaxresError, match=r"folder .*photos is not a dataset.*train/<class>"):
        load(tmp_path / "photos", tmp_path)


def test_corrupt_image_in_folder(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(JaxresError, match=r"cannot decode image .*train/dog/broken\.png"):
        load(root, tmp_path)


def test_truncated_jpeg_in_tar(tmp_path):
    entries = tree_tar_entries("root/")
    jpeg = encode_image("x.jpg", random_image(3, size=16))
    entries.append(("root/train/cat/truncated.jpg", jpeg[: len(jpeg) // 2]))
    with pytest.raises(JaxresError, match=r"cannot decode image root/train/cat/truncated\.jpg"):
        load(write_tar(tmp_path / "t.tar.gz", entries), tmp_path)


def test_damaged_gzip(tmp_path):
    archive = write_tar(tmp_path / "t.tar.gz", tree_tar_entries("root/"))
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(JaxresError, match=r"cannot read archive .*t\.tar\.gz"):
        load(archive, tmp_path)


def test_train_and_test_classes_differ(tmp_path):
    layout = tree_layout()
    layout["test"]["fox"] = layout["test"].pop("emu")
    difference = r"different class folders; only in train: \['emu'\], only in test: \['fox'\]"
    with pytest.raises(JaxresError, match=difference):
        load(write_tree(tmp_path / "tree", layout), tmp_path)
    entries = tree_tar_entries("root/", layout)
    with pytest.raises(JaxresError, match=r"only in train: \['emu'\], only in test: \['fox'\]"):
        load(write_tar(tmp_path / "t.tar.gz", entries), tmp_path)


def test_empty_class_folder(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "test" / "gnu").mkdir()
    (root / "train" / "gnu").mkdir()
    (root / "train" / "gnu" / "readme.txt").write_text("no images here")
    with pytest.raises(JaxresError, match=r"class folder train/gnu in .* has no PNG or JPEG images"):
        load(root, tmp_path)
    entries = tree_tar_entries("") + [("train/gnu/", None), ("test/gnu/", None)]
    with pytest.raises(JaxresError, match=r"class folder train/gnu in archive"):
        load(write_tar(tmp_path / "t.tar", entries, "w"), tmp_path)


def test_empty_split(tmp_path):
    layout = tree_layout()
    layout["test"] = {}
    root = write_tree(tmp_path / "tree", layout)
    (root / "test").mkdir()
    with pytest.raises(JaxresError, match=r"has no test/<class>/ folders"):
        load(root, tmp_path)
    entries = [entry for entry in tree_tar_entries("r/") if "/test/" not in entry[0]]
    with pytest.raises(JaxresError, match=r"archive .*t\.tar\.gz has no test/<class>/ folders"):
        load(write_tar(tmp_path / "t.tar.gz", entries), tmp_path)


def test_images_of_different_sizes(tmp_path):
    layout = tree_layout()
    layout["test"]["dog"]["t2.png"] = random_image(9, size=12)
    with pytest.raises(JaxresError, match=r"image .*test/dog/t2\.png is 12x12 pixels but .* is 8x8"):
        load(write_tree(tmp_path / "tree", layout), tmp_path)


def test_dangling_image_entry_in_a_class_folder_is_named(tmp_path):
    """Issue 11 item 15: a broken link (or an entry that cannot be followed) with an image
    extension was skipped silently; the README promises every unreadable image is named."""
    root = write_tree(tmp_path / "tree")
    # still skipped: hidden names and other extensions, even when broken; links to images load
    os.symlink(tmp_path / "gone.png", root / "train" / "dog" / ".hidden.png")
    os.symlink(tmp_path / "gone.txt", root / "train" / "dog" / "notes.txt")
    os.symlink(root / "test" / "cat" / "t1.png", root / "test" / "cat" / "t0.png")
    dataset = load(root, tmp_path)
    assert len(dataset.test) == 4
    os.symlink(tmp_path / "gone.png", root / "train" / "dog" / "broken.png")
    with pytest.raises(JaxresError, match=r"cannot read image .*train/dog/broken\.png: .*No such file"):
        load(root, tmp_path)
    (root / "train" / "dog" / "broken.png").unlink()
    os.symlink("loop.jpg", root / "test" / "emu" / "loop.jpg")
    with pytest.raises(JaxresError, match=r"cannot read image .*test/emu/loop\.jpg: .*symbolic links"):
        load(root, tmp_path)


def test_image_outside_class_folder(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "train" / "stray.png").write_bytes(encode_image("stray.png", random_image(0)))
    with pytest.raises(JaxresError, match=r"stray\.png is not inside a class folder"):
        load(root, tmp_path)
    entries = tree_tar_entries("r/") + [("r/train/cat/deeper/x.png", encode_image("x.png", random_image(0)))]
    with pytest.raises(JaxresError, match=r"image r/train/cat/deeper/x\.png .* not directly inside a class folder"):
        load(write_tar(tmp_path / "t.tar.gz", entries), tmp_path)


def test_several_roots_in_tar(tmp_path):
    entries = tree_tar_entries("a/") + tree_tar_entries("b/")
    with pytest.raises(JaxresError, match=r"several dataset roots: \['a/', 'b/'\]"):
        load(write_tar(tmp_path / "t.tar.gz", entries), tmp_path)


@pytest.mark.parametrize("culprit, payload", [("data_batch_3", b"\x80\x02}(truncated"), ("batches.meta", b"")])
def test_corrupt_official_pickle(tmp_path, culprit, payload):
    folder = write_official_folder(tmp_path / "cifar-10-batches-py", official_batches())
    (folder / culprit).write_bytes(payload)
    with pytest.raises(JaxresError, match=rf"cannot read CIFAR-10 batch .*{culprit}"):
        load(folder, tmp_path)


def test_official_batch_with_wrong_contents(tmp_path):
    batches = official_batches()
    batches["test_batch"][b"data"] = batches["test_batch"][b"data"][:, :100]
    with pytest.raises(JaxresError, match=r"test_batch has data uint8\[5, 100\]"):
        load(write_official_folder(tmp_path / "cifar-10-batches-py", batches), tmp_path)


def test_official_archive_missing_batch(tmp_path):
    entries = [(f"cifar-10-batches-py/{name}", pickle.dumps(batch)) for name, batch in official_batches().items()]
    entries = [entry for entry in entries if not entry[0].endswith("data_batch_4")]
    with pytest.raises(JaxresError, match=r"archive .* lacks cifar-10-batches-py/data_batch_4"):
        load(write_tar(tmp_path / "cifar-10-python.tar.gz", entries), tmp_path)


def test_non_rgb_images_become_rgb():
    gray16 = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, format="PNG")
    decoded = readers._decode_image("gray16.png", buffer.getvalue())
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 4, 3)
    np.testing.assert_array_equal(decoded, np.repeat((gray16 >> 8)[..., None], 3, axis=-1))
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 77, np.uint8)).convert("P").save(buffer, format="PNG")
    np.testing.assert_array_equal(readers._decode_image("palette.png", buffer.getvalue()), np.full((4, 4, 3), 77))


def test_split_checks_its_arrays():
    with pytest.raises(JaxresError, match=r"uint8\[N, H, W, 3\], got float32"):
        Split(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int32))
    with pytest.raises(JaxresError, match=r"labels must be int32\[2\]"):
        Split(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int32))


# ----------------------------------------------------------------------------------------------
# Decoding in worker processes


def archive_of(images: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, tuple[int, int]]]]:
    """Concatenated encoded images and their (name, (offset, size)) locations."""
    locations, offset = [], 0
    for name, encoded in images:
        locations.append((name, (offset, len(encoded))))
        offset += len(encoded)
    return b"".join(encoded for _, encoded in images), locations


@pytest.fixture
def worker_pool_allowed(monkeypatch):
    """The pools fork in a fresh Python (`decode_in_fresh_python`): safe whatever ran before."""
    if not sys.platform.startswith("linux"):
        pytest.skip("forked decoding workers are used on Linux")
    monkeypatch.setattr(readers, "DECODE_CHUNK_SIZE", 7)  # many chunks from few images (also in the child)


def test_worker_pool_decodes_like_one_process(tmp_path, worker_pool_allowed):
    encoded = [(f"train/c/{i}.png", encode_image("x.png", random_image(i))) for i in range(60)]
    archive_bytes, locations = archive_of(encoded)
    serial = readers._decode_images(
        locations, archive_bytes=archive_bytes, expected_count=None, show_progress=False, workers=1
    )
    pooled = decode_in_fresh_python(
        iter(locations), archive_bytes=archive_bytes, expected_count=None, show_progress=False, workers=2
    )
    np.testing.assert_array_equal(serial, pooled)
    np.testing.assert_array_equal(pooled, np.stack([random_image(i) for i in range(60)]))
    paths = []
    for i in range(20):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(encode_image("x.png", random_image(i)))
    from_files = decode_in_fresh_python([(p, p) for p in paths], expected_count=20, show_progress=False, workers=2)
    np.testing.assert_array_equal(from_files, serial[:20])


@pytest.mark.parametrize("odd_index", [0, 21, 25])  # first image; first of a chunk; inside a chunk
def test_worker_pool_names_the_culprit(worker_pool_allowed, odd_index):
    encoded = [(f"train/c/{i}.png", encode_image("x.png", random_image(i))) for i in range(40)]
    encoded[33] = ("train/c/broken.png", b"not an image")
    archive_bytes, locations = archive_of(encoded)
    with pytest.raises(JaxresError, match=r"cannot decode image train/c/broken\.png"):
        decode_in_fresh_python(
            locations, archive_bytes=archive_bytes, expected_count=None, show_progress=False, workers=2
        )
    encoded[33] = (f"train/c/{33}.png", encode_image("x.png", random_image(33)))
    encoded[odd_index] = ("train/c/odd.png", encode_image("x.png", random_image(0, size=9)))
    archive_bytes, locations = archive_of(encoded)
    if odd_index == 0:  # the first image sets the size, so the next one is named, with the first
        culprit = r"image train/c/1\.png is 8x8 pixels but train/c/odd\.png is 9x9"
    else:
        culprit = r"image train/c/odd\.png is 9x9 pixels but train/c/0\.png is 8x8"
    with pytest.raises(JaxresError, match=culprit):
        decode_in_fresh_python(
            locations, archive_bytes=archive_bytes, expected_count=None, show_progress=False, workers=2
        )


# ----------------------------------------------------------------------------------------------
# Synthetic shapes


def test_shapes_arrays_and_balance():
    dataset = make_shapes(num_train=503, num_test=100, image_size=32, seed=1)
    assert dataset.class_names == SHAPES_CLASSES and "shapes" in dataset.source
    for split, count in ((dataset.train, 503), (dataset.test, 100)):
        assert split.images.shape == (count, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (count,) and split.labels.dtype == np.int32
        assert split.masks.shape == (count, 32, 32) and split.masks.dtype == np.bool_
        counts = np.bincount(split.labels, minlength=len(SHAPES_CLASSES))
        assert counts.max() - counts.min() <= 1


def test_shapes_deterministic_per_seed():
    first, again, other = make_shapes(200, 50, seed=3), make_shapes(200, 50, seed=3), make_shapes(200, 50, seed=4)
    for name in ("images", "labels", "masks"):
        np.testing.assert_array_equal(getattr(first.train, name), getattr(again.train, name))
        np.testing.assert_array_equal(getattr(first.test, name), getattr(again.test, name))
    assert not np.array_equal(first.train.images, other.train.images)
    assert not np.array_equal(first.train.images, first.test.images[:50].repeat(4, axis=0))


def test_shapes_masks_mark_one_flat_coloured_object():
    dataset = make_shapes(num_train=1000, num_test=10, seed=0)
    images, masks, labels = dataset.train.images.astype(float), dataset.train.masks, dataset.train.labels
    area = masks.mean(axis=(1, 2))
    assert area.min() >= 0.06 and area.max() <= 0.32  # 10-25% up to rasterisation
    # Object size is no clue to the class: mean area per class within a few percent of each other.
    per_class_area = np.array([area[labels == k].mean() for k in range(len(SHAPES_CLASSES))])
    assert per_class_area.max() / per_class_area.min() < 1.1
    for image, mask in zip(images[:50], masks[:50]):
        inside, outside = image[mask], image[~mask]
        exactly_object_colour = np.abs(inside - np.median(inside, axis=0)).max(axis=-1) <= 2
        assert exactly_object_colour.mean() > 0.5  # one colour, but for anti-aliased edge pixels
        assert outside.std(axis=0).max() > 5  # a textured, not uniform, background
        assert np.linalg.norm(inside.mean(axis=0) - np.median(outside, axis=0)) > 40  # the object stands out
    # Object colour is no clue to the class: mean object colour per class is alike.
    object_colour = np.array([image[mask].mean(axis=0) for image, mask in zip(images, masks)])
    per_class_colour = np.array([object_colour[labels == k].mean(axis=0) for k in range(len(SHAPES_CLASSES))])
    assert np.ptp(per_class_colour, axis=0).max() < 25


def calls_made_by(function) -> tuple[object, int]:
    """function()'s result and how many Python and C functions it called (sys.setprofile events)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        result = function()
    finally:
        sys.setprofile(None)
    return result, calls


def test_shapes_via_load_dataset_drawn_with_whole_array_operations():
    """load_dataset("shapes") draws its 12,000 images (about 1-2 s) with NumPy operations on all
    images at once: it makes fewer than twice the function calls of drawing 60 images, where a
    loop over images would make thousands more. (Counted, not timed: a busy machine breaks any
    time limit.)"""
    make_shapes(num_train=50, num_test=10)  # once first: the first call also imports modules
    _, few = calls_made_by(lambda: make_shapes(num_train=50, num_test=10))
    dataset, many = calls_made_by(lambda: load_dataset("shapes", progress=False))
    assert 0 < many < 2 * few, (many, few)  # measured 574 and 493
    assert len(dataset.train) == 10000 and len(dataset.test) == 2000 and "seed 0" in dataset.source
    np.testing.assert_array_equal(dataset.test.labels, make_shapes(num_train=1, num_test=2000).test.labels)


def test_shapes_bad_arguments():
    with pytest.raises(JaxresError, match="num_test=0"):
        make_shapes(10, 0)
    with pytest.raises(JaxresError, match="image_size >= 8"):
        make_shapes(10, 10, image_size=4)


# ----------------------------------------------------------------------------------------------
# The real CIFAR-10 copy


@pytest.mark.slow
def test_real_cifar10_jpeg_archive(cifar10_dataset):
    dataset = cifar10_dataset
    assert dataset.class_names == CIFAR10_CLASSES
    assert dataset.train.images.shape == (50000, 32, 32, 3) and dataset.train.images.dtype == np.uint8
    assert dataset.test.images.shape == (10000, 32, 32, 3) and dataset.test.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(dataset.train.labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(dataset.test.labels), [1000] * 10)
    mean = dataset.train.images.reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, atol=0.01)


# ------------------------------------------------------------------ issue 25, item 5: a named error or a true record


def test_a_dataset_with_fewer_than_two_classes_is_refused(tmp_path):
    split = Split(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32))
    with pytest.raises(JaxresError, match=r"the dataset \(one\) has 1 class \(cat\): a classifier needs at least 2"):
        Dataset(split, split, ("cat",), "one")
    with pytest.raises(JaxresError, match=r"the dataset \(none\) has 0 classes: a classifier needs at least 2"):
        Dataset(split, split, (), "none")
    layout = {split_name: {"cat": {"a.png": random_image(1)}} for split_name in ("train", "test")}
    write_tree(tmp_path / "tree", layout)
    with pytest.raises(JaxresError, match=r"the dataset \(image folders at .*tree\) has 1 class \(cat\)"):
        load(tmp_path / "tree", tmp_path)


def test_a_train_subset_larger_than_the_training_set_is_named(tmp_path):
    from jaxres import train
    from tests.helpers import random_dataset, tiny_config

    with pytest.raises(JaxresError, match=r"train_subset 200 is larger than the training set \(128 images\): use at most 128"):
        train.prepare_run(tiny_config(tmp_path, train_subset=200), random_dataset())
    from jaxres import lr_find

    with pytest.raises(JaxresError, match=r"train_subset 200 is larger than the training set \(128 images\)"):
        lr_find.range_test_for_config(tiny_config(tmp_path, train_subset=200), random_dataset())  # the LR range test too
    data.check_train_subset(128, 128)  # all of it: fine
    data.check_train_subset(None, 128)


def test_a_tar_with_a_duplicate_member_name_is_refused(tmp_path):
    entries = tree_tar_entries("")
    name, payload = next((n, p) for n, p in entries if n.endswith("train/dog/b.png"))
    archive = write_tar(tmp_path / "twice.tar.gz", [*entries, ("./" + name, payload)])
    with pytest.raises(JaxresError, match=r"twice\.tar\.gz holds \./train/dog/b\.png more than once \(1 duplicate"):
        load(archive, tmp_path)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, OSError])
def test_the_cache_writer_removes_its_temporary_file_on_any_exception(tmp_path, monkeypatch, error):
    dataset = make_shapes(num_train=2, num_test=2, image_size=8)

    def interrupted(file, **arrays):
        file.write(b"partial")
        raise error("stopped mid-write")

    monkeypatch.setattr(np, "savez", interrupted)
    path = tmp_path / "cache" / "entry.npz"
    if error is OSError:
        with pytest.warns(UserWarning, match="could not write the dataset cache"):
            sources._write_cache(path, dataset)
    else:
        with pytest.raises(error):
            sources._write_cache(path, dataset)
    assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The package's layout


def run_fresh_python(code: str) -> None:
    """Runs `code` in a fresh Python (nothing imported yet) from the repository; fails with its stderr."""
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_augment_reads_the_constants_without_pil_or_tarfile():
    """The mean and std live in jaxres.data.constants, which Python reaches through the package:
    neither it nor the package may load the readers (PIL, tarfile)."""
    run_fresh_python(
        "import jaxres.augment, sys; "
        "assert 'PIL' not in sys.modules and 'tarfile' not in sys.modules, "
        "[name for name in ('PIL', 'tarfile') if name in sys.modules]"
    )


def test_every_public_name_of_the_package_resolves_to_its_part():
    from jaxres.data import constants, containers, shapes

    assert set(data.__all__) <= set(dir(data))
    for name in data.__all__:
        assert getattr(data, name) is not None, name
    assert data.load_dataset is sources.load_dataset and data.OFFICIAL_FOLDER == readers.OFFICIAL_FOLDER
    assert data.CIFAR10_MEAN is constants.CIFAR10_MEAN and data.Dataset is containers.Dataset
    assert data.make_shapes is shapes.make_shapes
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        data.no_such_name  # noqa: B018


def test_decoding_forks_only_before_jax_is_imported():
    """Forking once JAX's runtime runs may deadlock; a process that imported jax decodes alone."""
    if not sys.platform.startswith("linux"):
        pytest.skip("forked decoding workers are used on Linux")
    run_fresh_python(
        "from jaxres.data import readers; assert readers._fork_is_safe(); "
        "import jax; assert not readers._fork_is_safe()"
    )
