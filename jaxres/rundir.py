"""The run directory: every file a run writes into its workdir, and reading them back.

    WORKDIR/config.json         the run's TrainConfig (`load_config`)
    WORKDIR/dataset.json        what it trained on: class names, image shape, source, counts
    WORKDIR/checkpoint.msgpack  the training state and every epoch's metrics row (below)
    WORKDIR/metrics.jsonl       a readable copy of those rows, one JSON object per line
    WORKDIR/*.png               curves.png, lr_schedule.png, misclassified.png (jaxres.plots)

A checkpoint is one file, `checkpoint.msgpack`:

    b"jaxres checkpoint 2\\n"            header: what the file is, and its format version
    b"<sha256 of the payload, hex>\\n"   verified on every load: a damaged file never passes
    payload                             msgpack: {"state": the whole training state (params,
                                        batch_stats, optimizer state, loss scale, step) as a
                                        flax state dict, "history": the metrics row of every
                                        epoch the state has seen}

Every run file is written by `atomic_write_bytes`: to a temporary file in the same directory,
flushed and fsynced, then renamed over the old one with `os.replace`, so a crash at any moment
leaves either the previous file or the new one, whole. Because the state and the metrics rows
are committed by the same rename, a crash can never separate an epoch's state from its row:
metrics.jsonl is only a readable copy of the history, rewritten from the checkpoint
(`save_epoch`, `start_run_files`). Readers (`python -m jaxres.evaluate`, `python -m
jaxres.gradcam`) may therefore read a workdir while a run writes it: each file they open is one
whole version (tests/test_workdir_lock.py reads checkpoints while another process writes them).

One run writes a workdir at a time: the writer holds `WORKDIR/.jaxres.lock` (an exclusive
`flock`, released by the OS when the process ends, however it ends) for as long as it runs
(`workdir_lock`, `claims_workdir`); a second run on the same workdir is refused with an
error naming the process that holds it. The lock file holds that process's id, host and command
line, and is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import flax.serialization
import flax.traverse_util
import jax
import numpy as np

from jaxres.config import TrainConfig
from jaxres.errors import JaxresError, describe_os_error

CHECKPOINT_NAME = "checkpoint.msgpack"
CONFIG_NAME = "config.json"
DATA_INFO_NAME = "dataset.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAMES = ("curves.png", "lr_schedule.png", "misclassified.png")
# The files a run writes into its workdir (lr_find.png aside: `--peak-lr auto` writes it before
# the run's own files). A folder holding any of them must be a jaxres run, see `check_workdir`.
RUN_FILES = (CONFIG_NAME, DATA_INFO_NAME, METRICS_NAME, CHECKPOINT_NAME, *PLOT_NAMES)
LOCK_NAME = ".jaxres.lock"  # held by the one run writing the workdir (`workdir_lock`)
CHECKPOINT_HEADER = b"jaxres checkpoint 2\n"
# Permissions of every run file: readable by all, like the plots and the data caches (mkstemp
# alone would make them private to the owner, unlike every other output).
RUN_FILE_MODE = 0o644


def checkpoint_path(workdir: str | Path) -> Path:
    """The path of the run's checkpoint: WORKDIR/checkpoint.msgpack (it may not exist yet)."""
    return Path(workdir) / CHECKPOINT_NAME


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` (mode 0644) so that readers see the old file or the new one, never
    a part. An OSError (a full disk, say) leaves the old file as it was and names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), RUN_FILE_MODE)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # write/fsync errors name no file
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where the OS allows it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def remove_stale_temporaries(workdir: str | Path, names) -> list[Path]:
    """Delete the temporaries `atomic_write_bytes` leaves behind when killed mid-write
    (`NAME.XXXXXXXX.tmp`, for each of `names` in `workdir`); returns those removed."""
    removed = []
    for name in names:
        for stale in Path(workdir).glob(f"{name}.????????.tmp"):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def encode_checkpoint(state, history) -> bytes:
    """The bytes of a checkpoint file (see the module docstring) for the pytree `state`
    (arrays on the host) and the list of metrics rows `history`."""
    payload = flax.serialization.msgpack_serialize(
        {"state": flax.serialization.to_state_dict(state), "history": [dict(row) for row in history]}
    )
    return CHECKPOINT_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def save_checkpoint(workdir: str | Path, state, history=()) -> Path:
    """Write the pytree `state` (arrays fetched to host) and its metrics rows atomically into `workdir`."""
    path = checkpoint_path(workdir)
    atomic_write_bytes(path, encode_checkpoint(state, history))
    return path


def read_checkpoint(workdir: str | Path) -> tuple[dict, list[dict]]:
    """(state dict, history) of the checkpoint in `workdir`, its digest verified.

    The state dict is the raw nested dict of host arrays (see `load_checkpoint` to restore it
    into a state's structure). Raises JaxresError when the file is missing, not a jaxres
    checkpoint, or damaged.
    """
    path = checkpoint_path(workdir)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise JaxresError(f"no checkpoint at {path}") from None
    if not data.startswith(CHECKPOINT_HEADER):
        raise JaxresError(
            f"checkpoint {path} is corrupt or not a jaxres checkpoint: it lacks the header {CHECKPOINT_HEADER!r}"
        )
    digest, newline, payload = data[len(CHECKPOINT_HEADER) :].partition(b"\n")
    if not newline or digest != hashlib.sha256(payload).hexdigest().encode():
        raise JaxresError(
            f"checkpoint {path} is damaged: digest mismatch (its bytes changed after it was written)"
        )
    try:
        contents = flax.serialization.msgpack_restore(payload)
        state, history = contents["state"], list(contents["history"])
    except Exception as error:  # msgpack errors have many types
        raise JaxresError(f"checkpoint {path} is corrupt: {type(error).__name__}: {error}") from None
    return state, history


def _shape_and_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return tuple(np.shape(leaf)), np.dtype(dtype)


def check_state_dict(path: Path, found: dict, template) -> None:
    """Raise JaxresError naming the first leaf of the checkpoint `found` (a state dict) whose
    path, shape or dtype differs from `template`'s (a state, or its `jax.eval_shape`)."""
    expected = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(template), sep="/")
    present = flax.traverse_util.flatten_dict(found, sep="/") if isinstance(found, dict) else {}
    for key, leaf in expected.items():
        if key not in present:
            raise JaxresError(f"checkpoint {path} does not fit config.json's model: it has no leaf {key}")
        (want_shape, want_dtype), (shape, dtype) = _shape_and_dtype(leaf), _shape_and_dtype(present[key])
        if (shape, dtype) != (want_shape, want_dtype):
            raise JaxresError(
                f"checkpoint {path} does not fit config.json's model: leaf {key} is {dtype}{list(shape)} "
                f"in the checkpoint, the model expects {want_dtype}{list(want_shape)}"
            )
    extra = [key for key in present if key not in expected]
    if extra:
        raise JaxresError(f"checkpoint {path} does not fit config.json's model: unexpected leaf {extra[0]}")


def fit_state_dict(path: Path, found: dict, target):
    """The state dict `found` (read from the checkpoint at `path`) restored into the structure
    of `target`, after checking that every leaf fits (`check_state_dict`)."""
    check_state_dict(path, found, target)
    return flax.serialization.from_state_dict(target, found)


def load_checkpoint(workdir: str | Path, target) -> tuple[object, list[dict]]:
    """(state, history): the checkpoint in `workdir`, verified and restored into the structure
    of `target`, and the metrics rows of the epochs it has seen."""
    found, history = read_checkpoint(workdir)
    return fit_state_dict(checkpoint_path(workdir), found, target), history


def restore_checkpoint(workdir: str | Path, target):
    """The checkpoint in `workdir`, verified and restored into the structure of `target`."""
    return load_checkpoint(workdir, target)[0]


def load_config(workdir: str | Path) -> TrainConfig:
    """The TrainConfig saved in WORKDIR/config.json; JaxresError when there is none."""
    path = Path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise JaxresError(f"no {CONFIG_NAME} in {workdir}: is it a jaxres run directory?")
    return TrainConfig.load(path)


# --------------------------------------------------------------------------- dataset.json


def dataset_info(dataset, train_images: int) -> dict:
    """The contents of dataset.json for a run on `dataset` (a jaxres.data.Dataset) that trains
    on `train_images` of its training images (a `train_subset`, or all)."""
    return {
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.train.images.shape[1:]),
        "source": dataset.source,
        "train_images": int(train_images),
        "test_images": int(dataset.test.images.shape[0]),
    }


def _read_json_object(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JaxresError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise JaxresError(f"{path} is not a JSON object")
    return values


def read_dataset_info(workdir: str | Path) -> dict:
    """The run's dataset.json: class_names, image_shape, source, image counts."""
    path = Path(workdir) / DATA_INFO_NAME
    if not path.is_file():
        raise JaxresError(f"no {DATA_INFO_NAME} in {workdir}: is it a jaxres run directory?")
    info = _read_json_object(path)
    names, shape = info.get("class_names"), info.get("image_shape")
    if not (isinstance(names, list) and names and isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and n > 0 for n in shape)):  # fmt: skip
        raise JaxresError(f"{path} is not a jaxres dataset.json: it needs class_names and image_shape [H, W, C]")
    return info


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def check_data_fits_run(workdir: str | Path, dataset, train_images: int | None = None) -> None:
    """Raise JaxresError unless `dataset` (a jaxres.data.Dataset) is of the kind the run in
    `workdir` was trained on (its dataset.json): the same class names in the same order (the
    labels mean the same) and the same image shape [H, W, 3] in both splits. To resume a run
    (`train_images` given: the number it trains on), also the same image counts. The message
    names what differs, showing both."""
    info = read_dataset_info(workdir)
    where = f"the data ({dataset.source}) do not fit the run in {workdir} (trained on {info.get('source', '?')})"
    run_names, data_names = list(info["class_names"]), list(dataset.class_names)
    if run_names != data_names:
        raise JaxresError(f"{where}: class names differ: the run has {run_names}, the data have {data_names}")
    run_shape = tuple(info["image_shape"])
    for split in (dataset.train, dataset.test):
        data_shape = tuple(split.images.shape[1:])
        if data_shape != run_shape:
            raise JaxresError(
                f"{where}: image shape differs: the run's images are {_shape_text(run_shape)}, "
                f"these are {_shape_text(data_shape)}"
            )
    if train_images is not None:
        counts = {"train_images": int(train_images), "test_images": int(dataset.test.images.shape[0])}
        for key, count in counts.items():
            if info.get(key) != count:
                raise JaxresError(f"{where}: {key} differs: the run has {info.get(key)}, the data have {count}")


# --------------------------------------------------------------------------- metrics.jsonl


def metrics_text(history: list[dict]) -> str:
    """metrics.jsonl's text: one JSON object per row; a non-finite number (an fp16 epoch's mean
    loss over skipped steps, say) is written as null, since strict JSON has no NaN."""

    def strict(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return "".join(json.dumps({k: strict(v) for k, v in row.items()}, allow_nan=False) + "\n" for row in history)


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, null read back as NaN. (A run's own record of them is
    its checkpoint; `--resume` rewrites metrics.jsonl from there.)"""
    path = Path(workdir) / METRICS_NAME
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise JaxresError(
                f"{path} line {number} is not valid JSON ({error}); --resume rewrites the file from the checkpoint"
            ) from None
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


# --------------------------------------------------------------------------- a run's life


def _check_folder(workdir: Path) -> None:
    """Raise JaxresError when `workdir` is a file, or a folder of someone else's files (run
    files without a jaxres config.json)."""
    if workdir.exists() and not workdir.is_dir():
        raise JaxresError(f"--workdir {workdir} is a file, not a folder")
    present = [name for name in RUN_FILES if (workdir / name).exists()]
    if present:
        try:
            load_config(workdir)
        except JaxresError as error:
            raise JaxresError(
                f"--workdir {workdir} holds {', '.join(present)} but is not a jaxres run ({error}); "
                "refusing to overwrite its files: choose another --workdir"
            ) from None


# Workdirs whose lock this process holds: resolved path -> the lock file's descriptor
# (`workdir_lock` is re-entrant within a process: the CLI holds it around train_and_evaluate,
# which takes it again).
_held_locks: dict[Path, int] = {}


def _holder_text(path: Path) -> str:
    """Who holds the lock file at `path`, as its holder wrote it."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (it has not written its id yet)"
    return f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('command', '?')})"


def _in_use_error(workdir: Path) -> JaxresError:
    return JaxresError(
        f"--workdir {workdir} is in use by another run: {_holder_text(workdir / LOCK_NAME)}; "
        "wait for it to end, or choose another --workdir"
    )


def _refuse_if_in_use(workdir: Path) -> None:
    """Raise JaxresError naming the holder when another process holds `workdir`'s lock
    (looked at, not taken: a shared lock tried and dropped at once)."""
    if workdir.resolve() in _held_locks:
        return
    try:
        descriptor = os.open(workdir / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use_error(workdir) from None
    finally:
        os.close(descriptor)  # closing drops the shared lock


def _take_lock(workdir: Path) -> int:
    """The descriptor of `workdir`'s lock file, locked exclusively and holding this process's
    id, host and command line. Raises JaxresError when another process holds it."""
    path = workdir / LOCK_NAME
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, RUN_FILE_MODE)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise _in_use_error(workdir) from None
            try:  # the file locked may have been removed meanwhile by a holder releasing it
                if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        command = " ".join(" ".join(getattr(sys, "orig_argv", sys.argv)).split())  # one line, for the message
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:300]}
        os.ftruncate(descriptor, 0)
        os.write(descriptor, (json.dumps(holder) + "\n").encode())
    except OSError as error:
        raise JaxresError(f"cannot write to --workdir {workdir}: {describe_os_error(error)}") from None
    return descriptor


@contextlib.contextmanager
def workdir_lock(workdir: str | Path):
    """Hold `workdir`'s lock (WORKDIR/.jaxres.lock, an exclusive `flock`) while the block runs:
    the one writer of a workdir. Creates the folder. Re-entrant within a process.

    Raises JaxresError, before taking anything, when `workdir` is a file or someone else's
    folder (see `check_workdir`), cannot be written, or another process holds the lock (the
    message names it: id, host, command line). The OS drops the lock when the process ends,
    however it ends; a clean release also removes the lock file.
    """
    workdir = Path(workdir)
    _check_folder(workdir)
    key = workdir.resolve()
    if key in _held_locks:  # taken by an outer block of this process
        yield
        return
    descriptor = _take_lock(workdir)
    _held_locks[key] = descriptor
    try:
        yield
    finally:
        del _held_locks[key]
        with contextlib.suppress(OSError):
            (workdir / LOCK_NAME).unlink()  # while still holding it: a process that opened it before retries
        os.close(descriptor)


def claims_workdir(function):
    """Decorate `function(config, ..., resume=False, ...)` (train_and_evaluate) to run on a
    workdir it has claimed: `check_workdir(config.workdir, resume)` first, before any data is
    loaded (every process; only process 0 writes), then, on process 0, holding its lock
    (`workdir_lock`) until it returns. The one check of a run's workdir."""

    @functools.wraps(function)
    def claimed(config, *args, **kwargs):
        is_main = jax.process_index() == 0
        check_workdir(Path(config.workdir), kwargs.get("resume", False), writable=is_main)
        if not is_main:
            return function(config, *args, **kwargs)
        with workdir_lock(config.workdir):
            return function(config, *args, **kwargs)

    return claimed


def check_workdir(workdir: Path, resume: bool, *, writable: bool = True) -> None:
    """Check, before any data is loaded, that the run may use `workdir`.

    A run starts in a missing or empty folder, or one that is a jaxres run without a
    checkpoint (killed before its first epoch ended); it resumes only from a checkpoint. A
    folder holding run files (config.json, metrics.jsonl, ...) without a jaxres config.json is
    someone else's: refused, never overwritten. A folder another process is writing (it holds
    the lock, `workdir_lock`) is refused, naming that process. `writable`: also create the
    folder and write a probe file in it (the process that writes the run's files).
    """
    workdir = Path(workdir)
    _check_folder(workdir)
    _refuse_if_in_use(workdir)
    has_checkpoint = checkpoint_path(workdir).is_file()
    if has_checkpoint and not resume:
        raise JaxresError(
            f"{workdir} already holds a checkpoint; pass --resume to continue it, or choose another --workdir"
        )
    if resume and not has_checkpoint:
        why = "it does not exist" if not workdir.exists() else f"it holds no {CHECKPOINT_NAME}"
        raise JaxresError(f"nothing to resume in {workdir}: {why}; start the run without --resume")
    if writable:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=workdir):
                pass
        except OSError as error:
            raise JaxresError(f"cannot write to --workdir {workdir}: {describe_os_error(error)}") from None


def read_resumable(workdir: Path, config: TrainConfig) -> tuple[dict, list[dict]]:
    """(state dict, history) of the checkpoint a resumed run of `config` continues, read and
    verified before any data is loaded. Raises JaxresError when the saved config.json's
    recipe differs from `config`'s (naming the fields) or the checkpoint is damaged."""
    changed = load_config(workdir).recipe_differences(config)
    if changed:
        raise JaxresError(
            f"cannot resume {workdir}: its config.json differs in {', '.join(changed)}; "
            "resume with the same recipe (or omit those flags: --resume alone reuses the saved ones)"
        )
    return read_checkpoint(workdir)


def start_run_files(workdir: Path, config: TrainConfig, info: dict, history: list[dict]) -> None:
    """At every (re)start: clear the temporaries of a killed write, then write config.json,
    dataset.json and metrics.jsonl (the checkpoint's rows: a kill between the checkpoint's
    rename and metrics.jsonl's left the file one row short; this restores exactly the
    checkpoint's rows, never losing or repeating one)."""
    remove_stale_temporaries(workdir, RUN_FILES)
    atomic_write_bytes(workdir / CONFIG_NAME, config.to_json().encode())
    atomic_write_bytes(workdir / DATA_INFO_NAME, json.dumps(info, indent=2).encode())
    atomic_write_bytes(workdir / METRICS_NAME, metrics_text(history).encode())


def save_epoch(workdir: Path, state, history: list[dict]) -> None:
    """Commit an epoch: its state and metrics row together (the checkpoint, whose history
    holds every row), then metrics.jsonl rewritten from that history. state: on the host.
    An OSError (a full disk, say) becomes a JaxresError that says what is still whole."""
    try:
        save_checkpoint(workdir, state, history)
        atomic_write_bytes(workdir / METRICS_NAME, metrics_text(history).encode())
    except OSError as error:  # the renamed-over files are still whole
        kept = (
            f"the last checkpoint in {workdir} is whole (make room, then continue with --resume)"
            if checkpoint_path(workdir).is_file()
            else "no checkpoint was written (make room, then start again)"
        )
        raise JaxresError(f"cannot save epoch {len(history)}: {describe_os_error(error)}; {kept}") from None
