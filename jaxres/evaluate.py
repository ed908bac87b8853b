"""Evaluation: the jitted evaluation over a test split, test-time augmentation, and
evaluating a saved run.

    python -m jaxres.evaluate --workdir RUN [--data SOURCE] [--tta none flip flip_translate]

Prints one line per TTA mode: test loss and accuracy on the whole test split.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxres import augment, backends, data, loops, models, optim, parallel, rundir
from jaxres.config import TTA_MODES, TrainConfig


def shift_images(inputs: jax.Array, dy: int, dx: int, fill: str = "zeros") -> jax.Array:
    """Translate by (dy, dx) pixels, filling with zeros (the mean colour once normalised) or,
    with fill "reflect", the mirrored edge (torch's F.pad 'reflect', then a window:
    airbench's TTA shifts). inputs: float[N, H, W, C] -> float[N, H, W, C].
    """
    if dy == 0 and dx == 0:
        return inputs
    height, width = inputs.shape[1:3]
    pad = max(abs(dy), abs(dx))
    mode = "reflect" if fill == "reflect" else "constant"
    padded = jnp.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    return padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width, :]


TTA_SHIFTS = {
    "none": [(0, 0)],
    "flip": [(0, 0)],
    "flip_translate": [(0, 0), (1, 1), (-1, -1)],
    "flip_translate_reflect": [(0, 0), (1, 1), (-1, -1)],
}
# the weight of each shift's (image, mirror) pair; equal unless given (airbench's TTA level 2:
# 1/2 for the plain pair, 1/4 for each shifted one)
TTA_WEIGHTS = {"flip_translate_reflect": (0.5, 0.25, 0.25)}


def predict_logits(model, variables, inputs: jax.Array, tta: str = "none") -> jax.Array:
    """Inference-mode logits, averaged over test-time augmentations.

    inputs: float32[N, H, W, 3] (normalised) -> float32[N, K]. tta: "none"; "flip" (the
    image and its mirror); "flip_translate" (both, each also shifted by (1, 1) and
    (-1, -1) pixels, zero-filled: 6 views, equal weights); "flip_translate_reflect" (the
    same 6 views reflect-padded, weighted as airbench's TTA level 2,
    legacy/airbench94.py `infer_mirror_translate`: 1/4 each for the image and its mirror,
    1/8 for each shifted view). The (weighted) mean is taken over logits.
    """
    if tta in TTA_WEIGHTS:
        total = 0.0
        for (dy, dx), weight in zip(TTA_SHIFTS[tta], TTA_WEIGHTS[tta]):
            shifted = shift_images(inputs, dy, dx, fill="reflect")
            pair = model.apply(variables, shifted, train=False) + model.apply(variables, shifted[:, :, ::-1, :], train=False)
            total = total + (weight / 2) * pair
        return total
    views = []
    for dy, dx in TTA_SHIFTS[tta]:
        shifted = shift_images(inputs, dy, dx)
        views.append(shifted)
        if tta != "none":
            views.append(shifted[:, :, ::-1, :])
    logits = [model.apply(variables, view, train=False) for view in views]
    return sum(logits) / len(logits)


def make_evaluate(model, config: TrainConfig, mesh: Mesh, tta: str | None = None, loop: str | None = None):
    """`evaluate(variables, images, labels) -> {loss, accuracy, predictions}`, compiled.

    images: uint8[N, H, W, 3]; labels: int32[N]. Runs in batches of eval_batch_size
    (the last one padded and masked) with BatchNorm in inference mode and the test-time
    augmentation `tta` (default `config.tta`; see `predict_logits`). loss is the
    training criterion (label-smoothed cross-entropy) averaged over the N images;
    predictions: int32[N]. `loop`: the batches run in one `lax.scan` or a host loop
    (`jaxres.loops`), default `loops.choose_loop(config.epoch_loop, model)`; the returned
    function's `.loop` says which.
    """
    tta = config.tta if tta is None else tta
    batch_size = config.eval_batch_size
    batch_sharding = parallel.batch_sharding(mesh)

    def prepare(variables, images, labels):  # xs: the padded batches and their validity masks
        n = images.shape[0]
        num_batches = -(-n // batch_size)
        pad = num_batches * batch_size - n
        shape = lambda x: x.reshape(num_batches, batch_size, *x.shape[1:])  # noqa: E731
        valid = jnp.arange(num_batches * batch_size) < n
        images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
        return (shape(images), shape(jnp.pad(labels, (0, pad))), shape(valid)), None

    def body(_, batch, context, variables, images, labels):
        batch_images, batch_labels, batch_valid = batch
        inputs = jax.lax.with_sharding_constraint(augment.normalize(batch_images), batch_sharding)
        logits = predict_logits(model, variables, inputs, tta)
        losses = optim.smoothed_cross_entropy(logits, batch_labels, config.label_smoothing)
        predictions = jnp.argmax(logits, -1).astype(jnp.int32)
        correct = (predictions == batch_labels) & batch_valid
        return None, (jnp.where(batch_valid, losses, 0.0).sum(), correct.sum(), predictions)

    def finish(_, outputs, context, variables, images, labels):
        loss_sums, correct, predictions = outputs
        n = images.shape[0]
        return {"loss": loss_sums.sum() / n, "accuracy": correct.sum() / n, "predictions": predictions.reshape(-1)[:n]}

    loop = loops.choose_loop(config.epoch_loop, model) if loop is None else loop
    program = loops.epoch_program(loop, prepare, body, finish, out_shardings=parallel.replicated(mesh), donate_carry=False)
    return program.with_carry(None)


# --------------------------------------------------------------------------- a saved run


def load_for_inference(workdir):
    """(model, variables, config) of a trained run, for evaluation or Grad-CAM.

    model: the Flax module, computing in float32 whatever precision trained it; variables:
    {"params", "batch_stats"} as restored from the checkpoint (verified, every leaf checked
    against the model's); config: the run's TrainConfig.
    """
    config = rundir.load_config(workdir)
    info = rundir.read_dataset_info(workdir)
    model = backends.model_from_config(dataclasses.replace(config, precision="fp32"), num_classes=len(info["class_names"]))
    # Only the structure is needed: eval_shape skips the (slow to compile) random init.
    image_shape = tuple(info["image_shape"])
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), image_shape))
    template = {name: shapes[name] for name in ("params", "batch_stats") if name in shapes}  # checked in this order
    state, _ = rundir.read_checkpoint(workdir)
    found = {name: state.get(name, {}) for name in template} if isinstance(state, dict) else state
    variables = rundir.fit_state_dict(rundir.checkpoint_path(workdir), found, template)
    return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, config


def load_run_and_data(workdir, data_source: str | None = None, cache_dir: str | None = None):
    """(model, variables, config, dataset) of the trained run in `workdir` and the dataset
    `data_source` (default: the one it was trained on; cache_dir: default the run's), checked
    with `rundir.check_data_fits_run` before anything is computed. config.data and
    config.cache_dir are the ones used."""
    model, variables, config = load_for_inference(workdir)
    config = dataclasses.replace(config, data=data_source or config.data, cache_dir=cache_dir or config.cache_dir)
    dataset = data.load_dataset(config.data, cache_dir=config.cache_dir, progress=sys.stderr.isatty())
    rundir.check_data_fits_run(workdir, dataset)
    return model, variables, config, dataset


def evaluate_run(workdir, data_source: str | None = None, tta_modes=TTA_MODES, cache_dir: str | None = None) -> dict:
    """{tta mode: {"loss", "accuracy"}} for the run in `workdir` on its test split.

    data_source: the dataset (default: the one the run was trained on); it must have the
    run's class names and image shape (JaxresError otherwise).
    """
    model, variables, config, dataset = load_run_and_data(workdir, data_source, cache_dir)
    mesh = parallel.make_mesh()
    images = parallel.replicate(mesh, dataset.test.images)
    labels = parallel.replicate(mesh, dataset.test.labels)
    variables = parallel.replicate_tree(mesh, variables)
    # decided once for every mode (auto traces the model to look for XLA convolutions)
    loop = loops.choose_loop(config.epoch_loop, model, tuple(dataset.test.images.shape[1:]))
    results = {}
    for mode in tta_modes:
        evaluation = jax.device_get(make_evaluate(model, config, mesh, tta=mode, loop=loop)(variables, images, labels))
        results[mode] = {"loss": float(evaluation["loss"]), "accuracy": float(evaluation["accuracy"])}
    return results


if __name__ == "__main__":  # `python -m jaxres.evaluate`: the command line lives in jaxres.cli
    from jaxres import cli

    sys.exit(cli.evaluate_main())
