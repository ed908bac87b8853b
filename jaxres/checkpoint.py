"""Atomic, verified checkpoints and exact resume.

A checkpoint is one file, `checkpoint.msgpack` in the run's workdir (next to `config.json`):

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
metrics.jsonl is only a readable copy of the history, rewritten from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import flax.serialization
import flax.traverse_util
import jax
import numpy as np

from jaxres.config import TrainConfig
from jaxres.errors import JaxresError

CHECKPOINT_NAME = "checkpoint.msgpack"
CONFIG_NAME = "config.json"
CHECKPOINT_HEADER = b"jaxres checkpoint 2\n"
# Permissions of every run file: readable by all, like the plots and the data caches (mkstemp
# alone would make them private to the owner, unlike every other output).
RUN_FILE_MODE = 0o644


def checkpoint_path(workdir: str | Path) -> Path:
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
    path = Path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise JaxresError(f"no {CONFIG_NAME} in {workdir}: is it a jaxres run directory?")
    return TrainConfig.load(path)


def load_for_inference(workdir: str | Path):
    """(model, variables, config) of a trained run, for evaluation or Grad-CAM.

    model: the Flax module, computing in float32 whatever precision trained it; variables: {"params", "batch_stats"} as restored;
    config: the run's TrainConfig.
    """
    from jaxres import train  # train imports this module

    config = load_config(workdir)
    info = train.read_dataset_info(workdir)
    float32_config = dataclasses.replace(config, precision="fp32")
    model = train.build_model(float32_config, num_classes=len(info["class_names"]))
    # Only the structure is needed: eval_shape skips the (slow to compile) random init.
    template = jax.eval_shape(lambda: train.initial_state_template(config, model, tuple(info["image_shape"])))
    state = restore_checkpoint(workdir, template)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables, config
