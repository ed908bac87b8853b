"""Helpers shared by several test files and by the scripts tests run in child processes: fake
official CIFAR-10 archives, tars, a loopback address where nothing listens, random model
variables, tiny training runs, and decoding in a fresh Python."""

from __future__ import annotations

import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from benchmarks.common import random_variables  # noqa: F401  (the tests import it from here)
from jaxres import data
from jaxres.config import TrainConfig
from jaxres.data import Dataset, Split, readers
from jaxres.errors import JaxresError

REPO = Path(__file__).resolve().parents[1]


def write_tar(path: Path, entries: list[tuple[str, bytes | None]], mode: str = "w:gz") -> Path:
    """A tar of (member name, bytes) pairs, in the given order; bytes None = a folder."""
    with tarfile.open(path, mode) as archive:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


CIFAR_TEST_CLASSES = [b"plane", b"car", b"bird"]


def official_batches(images_per_batch: int = 4) -> dict[str, dict]:
    """Fake official batches: file name -> dict with bytes keys like the real pickles."""
    rng = np.random.default_rng(0)
    batches = {}
    for index, name in enumerate([*data.OFFICIAL_TRAIN_FILES, "test_batch"]):
        count = images_per_batch + index % 2
        batches[name] = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"labels": [int(label) for label in rng.integers(0, 3, count)],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(count)],
        }
    batches["batches.meta"] = {b"label_names": CIFAR_TEST_CLASSES, b"num_vis": 3072}
    return batches


def write_official_folder(folder: Path, batches: dict[str, dict]) -> Path:
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def check_official_dataset(dataset: Dataset, batches: dict[str, dict]) -> None:
    assert dataset.class_names == ("plane", "car", "bird")
    train_files = data.OFFICIAL_TRAIN_FILES
    want_train = np.concatenate([chw_to_hwc(batches[name][b"data"]) for name in train_files])
    np.testing.assert_array_equal(dataset.train.images, want_train)
    np.testing.assert_array_equal(dataset.train.labels, sum((batches[name][b"labels"] for name in train_files), []))
    np.testing.assert_array_equal(dataset.test.images, chw_to_hwc(batches["test_batch"][b"data"]))
    assert dataset.train.images.shape[1:] == (32, 32, 3) and dataset.test.labels.dtype == np.int32


def official_tar_entries(batches: dict[str, dict]) -> list[tuple[str, bytes | None]]:
    """`write_tar` entries laid out like the real cifar-10-python.tar.gz: the folder, its
    pickled batches, and a readme.html among them (which the reader must skip)."""
    entries = [(data.OFFICIAL_FOLDER, None)]
    entries += [(f"{data.OFFICIAL_FOLDER}/{name}", pickle.dumps(batch, protocol=2)) for name, batch in batches.items()]
    entries.insert(3, (f"{data.OFFICIAL_FOLDER}/readme.html", b"<html></html>"))
    return entries


def write_official_tar(path: Path, batches: dict[str, dict]) -> Path:
    """A fake cifar-10-python.tar.gz at `path` holding `batches` (see `official_batches`)."""
    return write_tar(path, official_tar_entries(batches))


def unused_loopback_url(path: str = "/cifar-10-python.tar.gz") -> str:
    """An http://127.0.0.1 address on a port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def files_under(folder: Path) -> list[str]:
    """The paths of the files below `folder`, relative to it, sorted ([] when it does not exist)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------- tiny training runs


def random_dataset(num_train: int = 128, num_test: int = 40, seed: int = 0) -> Dataset:
    """Random uint8 images with random labels of 4 classes: the cheapest data to train on."""
    rng = np.random.default_rng(seed)

    def split(n):
        return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int32))

    return Dataset(split(num_train), split(num_test), ("a", "b", "c", "d"), "random test images")


def tiny_config(workdir, **overrides) -> TrainConfig:
    """A run that trains in seconds: width 1/16, 2 epochs of batches of 32."""
    values = dict(
        width=0.0625, epochs=2, batch_size=32, eval_batch_size=20, peak_lr=0.2, workdir=str(workdir),
        misclassified_to_plot=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


def quiet(_):
    """A `log` that prints nothing."""


def stop_after_first_epoch(row: dict) -> bool:
    """An `on_epoch` for `train_and_evaluate` that ends the run after epoch 1 (an interruption)."""
    return row["epoch"] == 1


# --------------------------------------------------------------------------- decoding in a fresh Python

# Forking a process whose JAX runtime runs is unsafe, so jaxres decodes in one process once jax is
# imported, as it is in every test session. So the worker pool runs in a child that imports only
# jaxres.data.readers (which imports no jax), whatever ran before in the session. Each worker
# records its pid, so the child checks that the chunks were decoded by other processes.
_POOLED_DECODE_SCRIPT = textwrap.dedent(
    """
    import os, pickle, sys
    from pathlib import Path
    from jaxres.data import readers
    from jaxres.errors import JaxresError

    assert readers._fork_is_safe(), "the child must not have imported jax"
    folder = sys.argv[1]
    with open(os.path.join(folder, "inputs.pickle"), "rb") as file:
        chunk_size, named_locations, options = pickle.load(file)
    readers.DECODE_CHUNK_SIZE = chunk_size
    decode_chunk = readers._decode_image_chunk_in_worker

    def decode_chunk_and_record_pid(chunk):
        with open(os.path.join(folder, "pids"), "a") as file:
            file.write(f"{os.getpid()}\\n")
        return decode_chunk(chunk)

    readers._decode_image_chunk_in_worker = decode_chunk_and_record_pid
    try:
        result = ("images", readers._decode_images(iter(named_locations), **options))
        pids = Path(folder, "pids")
        decoders = {int(pid) for pid in pids.read_text().split()} if pids.exists() else set()
        assert decoders and os.getpid() not in decoders, f"chunks decoded by {decoders}, not by workers"
    except JaxresError as error:
        result = ("JaxresError", str(error))
    with open(os.path.join(folder, "result.pickle"), "wb") as file:
        pickle.dump(result, file)
    """
)


def decode_in_fresh_python(named_locations: Iterable, *, workers: int = 2, **options) -> np.ndarray:
    """`readers._decode_images(named_locations, workers=workers, **options)` in a fresh Python that
    has not imported JAX, so its worker pool forks safely; with this process's
    `readers.DECODE_CHUNK_SIZE`. Returns the images, or raises the child's JaxresError (its message)."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = (readers.DECODE_CHUNK_SIZE, list(named_locations), {**options, "workers": workers})
        Path(folder, "inputs.pickle").write_bytes(pickle.dumps(inputs))
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        completed = subprocess.run(
            [sys.executable, "-c", _POOLED_DECODE_SCRIPT, folder], env=env, cwd=REPO, capture_output=True,
            text=True, timeout=300,
        )
        if completed.returncode != 0:
            raise AssertionError(f"decoding in a fresh Python failed:\n{completed.stderr[-3000:]}")
        kind, value = pickle.loads(Path(folder, "result.pickle").read_bytes())
    if kind == "JaxresError":
        raise JaxresError(value)
    return value
