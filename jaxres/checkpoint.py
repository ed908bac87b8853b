"""Atomic checkpoints and exact resume.

A checkpoint is one msgpack file (`flax.serialization`) holding the whole training
state (params, batch_stats, optimizer state, loss scale, the epoch finished) next to
`config.json` in the run's workdir. It is written to a temporary file in the same
directory, flushed and fsynced, then renamed over the old one with `os.replace`, so a
crash at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import flax.serialization
import jax

from jaxres.config import TrainConfig
from jaxres.errors import JaxresError

CHECKPOINT_NAME = "checkpoint.msgpack"
CONFIG_NAME = "config.json"


def checkpoint_path(workdir: str | Path) -> Path:
    return Path(workdir) / CHECKPOINT_NAME


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(workdir: str | Path, state) -> Path:
    """Serialise the pytree `state` (arrays fetched to host) atomically into `workdir`."""
    path = checkpoint_path(workdir)
    atomic_write_bytes(path, flax.serialization.to_bytes(state))
    return path


def restore_checkpoint(workdir: str | Path, target):
    """The checkpoint in `workdir`, restored into the structure of `target`."""
    path = checkpoint_path(workdir)
    if not path.is_file():
        raise JaxresError(f"no checkpoint at {path}")
    try:
        return flax.serialization.from_bytes(target, path.read_bytes())
    except Exception as error:  # msgpack and structure errors have many types
        raise JaxresError(f"checkpoint {path} is corrupt or from another model: {error}") from None


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
