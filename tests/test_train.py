"""Training: schedule, loss, optimizer, loss scaling, determinism, resume, failure modes, CLI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres import backends, evaluate, models, monitoring, optim, parallel, precision, rundir, train
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError
from tests.helpers import quiet, random_dataset, stop_after_first_epoch, tiny_config

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ math against NumPy / by hand


def test_one_cycle_lr_matches_numpy_interpolation():
    schedule = optim.one_cycle_lr(0.4, total_steps=240, peak_step=50)
    steps = np.arange(0, 241)
    expected = np.interp(steps, [0, 50, 240], [0.0, 0.4, 0.0])
    np.testing.assert_allclose(np.asarray(schedule(steps)), expected, rtol=1e-6, atol=1e-7)


def test_default_recipe_peaks_at_epoch_five_of_twenty_four():
    config = TrainConfig()
    _, schedule = optim.make_optimizer(config, steps_per_epoch=97)
    rates = np.asarray(schedule(np.arange(24 * 97)))
    assert rates.argmax() == 5 * 97
    assert rates.max() == pytest.approx(0.4)
    assert rates[0] == 0.0


def test_label_smoothed_loss_matches_hand_computation():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 1])
    smoothing = 0.2
    # targets: 0.8 * onehot + 0.2 / 3
    targets = np.array([[0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3], [0.2 / 3, 0.8 + 0.2 / 3, 0.2 / 3]])
    log_softmax = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    expected = -(targets * log_softmax).sum(-1).mean()
    assert float(optim.smoothed_cross_entropy(logits, labels, smoothing).mean()) == pytest.approx(expected, rel=1e-6)
    # and without smoothing, plain cross-entropy: -log p(label)
    assert float(optim.smoothed_cross_entropy(logits, labels, 0.0).mean()) == pytest.approx(
        -(log_softmax[0, 0] + log_softmax[1, 1]) / 2, rel=1e-6
    )



def test_label_smoothed_loss_takes_soft_targets_per_example():
    """One loss for hard and soft targets: one-hot rows give the hard-label loss; a mixed row
    (RICAP, mixup, CutMix) gives -sum(smoothed target * log softmax), per example."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    labels = jnp.array([0, 3, 4, 1])
    hard = optim.smoothed_cross_entropy(logits, labels, 0.1)
    assert hard.shape == (4,)
    np.testing.assert_allclose(optim.smoothed_cross_entropy(logits, jax.nn.one_hot(labels, 5), 0.1), hard, rtol=1e-6)
    soft = rng.dirichlet(np.ones(5), size=4)
    log_softmax = np.asarray(logits, np.float64) - np.log(np.exp(np.asarray(logits, np.float64)).sum(-1, keepdims=True))
    expected = -((0.9 * soft + 0.1 / 5) * log_softmax).sum(-1)
    np.testing.assert_allclose(optim.smoothed_cross_entropy(logits, jnp.asarray(soft, jnp.float32), 0.1), expected, rtol=1e-5)

def test_optimizer_is_torch_style_nesterov_sgd_with_coupled_weight_decay():
    """Three steps against a NumPy transcription of torch.optim.SGD(nesterov=True, weight_decay)."""
    config = TrainConfig(epochs=1, peak_lr=0.3, peak_epoch=0.5, weight_decay=0.01, momentum=0.9)
    optimizer, schedule = optim.make_optimizer(config, steps_per_epoch=4)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.5, 0.1, 0.0]), np.array([0.3, 0.3, 0.3])]
    state = optimizer.init(params)
    p, buffer = np.array([1.0, -2.0, 0.5]), None
    for step, g in enumerate(grads):
        updates, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, updates)
        d = g + 0.01 * p
        buffer = d if buffer is None else 0.9 * buffer + d
        p = p - float(schedule(step)) * (d + 0.9 * buffer)
        np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-7)


def test_loss_scale_backs_off_on_overflow_and_grows_after_interval():
    state = precision.init_loss_scale(1024.0)
    state = precision.update_loss_scale(state, jnp.array(False), growth_interval=2)
    assert float(state.scale) == 512.0 and int(state.good_steps) == 0
    state = precision.update_loss_scale(state, jnp.array(True), growth_interval=2)
    assert float(state.scale) == 512.0 and int(state.good_steps) == 1
    state = precision.update_loss_scale(state, jnp.array(True), growth_interval=2)
    assert float(state.scale) == 1024.0 and int(state.good_steps) == 0


# ------------------------------------------------------------------ fp16 dynamic loss scaling


def test_fp16_step_with_overflowing_gradients_is_skipped_and_scale_backs_off():
    config = TrainConfig(
        width=0.0625, batch_size=8, precision="fp16", initial_loss_scale=2.0**60, epochs=1, peak_epoch=0
    )
    model = backends.model_from_config(config, num_classes=4)
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch=10)
    state = train.init_train_state(config, optimizer, models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    labels = jnp.arange(8) % 4
    step = jax.jit(lambda s, k: train.train_step(s, images, labels, k, model=model, optimizer=optimizer, config=config))

    overflowed, metrics = step(state, jax.random.PRNGKey(1))
    assert not bool(metrics["finite"]), "a loss scale of 2^60 must overflow float16 gradients"
    chex.assert_trees_all_equal(overflowed.params, state.params)
    chex.assert_trees_all_equal(overflowed.batch_stats, state.batch_stats)
    chex.assert_trees_all_equal(overflowed.opt_state, state.opt_state)
    assert float(overflowed.loss_scale.scale) == 2.0**59

    recovered = overflowed.replace(loss_scale=precision.init_loss_scale(2.0**10))
    stepped, metrics = step(recovered, jax.random.PRNGKey(1))
    assert bool(metrics["finite"])
    assert not np.array_equal(stepped.params["classifier"]["kernel"], state.params["classifier"]["kernel"])
    assert float(stepped.loss_scale.scale) == 2.0**10


# ------------------------------------------------------------------ runs: outputs, determinism, resume


@pytest.fixture(scope="module")
def dataset():
    return random_dataset()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dataset):
    config = tiny_config(tmp_path_factory.mktemp("run") / "full")
    return train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet)


def test_run_writes_config_metrics_checkpoint_and_plots(finished_run):
    workdir = Path(finished_run.config.workdir)
    for name in ["config.json", "dataset.json", "metrics.jsonl", "checkpoint.msgpack", "curves.png", "lr_schedule.png", "misclassified.png"]:
        assert (workdir / name).is_file(), name
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ["lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "images_per_second", "loss_scale"]:
        assert all(np.isfinite(row[key]) for row in rows), key
    assert TrainConfig.load(workdir / "config.json") == finished_run.config


def test_load_for_inference_restores_the_trained_variables(finished_run, dataset):
    model, variables, config = evaluate.load_for_inference(finished_run.config.workdir)
    assert config == finished_run.config
    chex.assert_trees_all_close(variables["params"], jax.device_get(finished_run.state.params))
    logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
    chex.assert_shape(logits, (2, 4))


def test_same_seed_gives_the_same_parameters(finished_run, dataset, tmp_path):
    again = train.train_and_evaluate(tiny_config(tmp_path / "again"), dataset=dataset, progress=False, log=quiet)
    chex.assert_trees_all_equal(jax.device_get(again.state.params), jax.device_get(finished_run.state.params))
    assert again.history[-1]["test_loss"] == finished_run.history[-1]["test_loss"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(finished_run, dataset, tmp_path):
    config = tiny_config(tmp_path / "resumed")
    first = train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, on_epoch=stop_after_first_epoch)
    assert len(first.history) == 1
    resumed = train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, resume=True)
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(finished_run.state))
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]


def test_existing_checkpoint_is_not_overwritten_without_resume(finished_run, dataset):
    before = Path(finished_run.config.workdir, "checkpoint.msgpack").read_bytes()
    with pytest.raises(JaxresError, match="already holds a checkpoint; pass --resume"):
        train.train_and_evaluate(finished_run.config, dataset=dataset, progress=False, log=quiet)
    assert Path(finished_run.config.workdir, "checkpoint.msgpack").read_bytes() == before


def test_resume_with_different_options_names_them(finished_run, dataset):
    changed = dataclasses.replace(finished_run.config, peak_lr=0.9, epochs=3)
    with pytest.raises(JaxresError, match="differs in epochs, peak_lr"):
        train.train_and_evaluate(changed, dataset=dataset, progress=False, log=quiet, resume=True)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "nan")
    train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, on_epoch=stop_after_first_epoch)
    saved = (tmp_path / "nan" / "checkpoint.msgpack").read_bytes()
    monkeypatch.setattr(optim, "smoothed_cross_entropy", lambda logits, labels, smoothing: jnp.log(-jnp.mean(logits**2)))
    with pytest.raises(monitoring.NonFiniteLossError, match=r"non-finite at epoch 2, step 1.*epoch 1\) in .* is intact"):
        train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, resume=True)
    assert (tmp_path / "nan" / "checkpoint.msgpack").read_bytes() == saved


def test_corrupt_checkpoint_is_reported_by_path(tmp_path, dataset):
    config = tiny_config(tmp_path / "corrupt")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "checkpoint.msgpack").write_bytes(b"not a checkpoint")
    (tmp_path / "corrupt" / "config.json").write_text(config.to_json())
    with pytest.raises(JaxresError, match="checkpoint.msgpack is corrupt"):
        train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, resume=True)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    rundir.atomic_write_bytes(target, b"old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        rundir.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"], "the temporary file must be cleaned up"


# ------------------------------------------------------------------ command line


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxres.train", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_help_lists_every_config_flag():
    completed = run_cli("--help")
    assert completed.returncode == 0
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in completed.stdout
    assert "--resume" in completed.stdout


def test_cli_reports_a_missing_data_path_without_traceback(tmp_path):
    completed = run_cli("--data", str(tmp_path / "nowhere.tar.gz"), "--workdir", str(tmp_path / "run"))
    assert completed.returncode == 2
    assert "error:" in completed.stderr and "nowhere.tar.gz" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cli_rejects_impossible_values_by_name(tmp_path):
    completed = run_cli("--data", "shapes", "--precision", "fp8", "--workdir", str(tmp_path / "run"))
    assert completed.returncode == 2
    assert "unknown precision 'fp8'" in completed.stderr and "Traceback" not in completed.stderr


def test_config_validation_names_the_knob():
    with pytest.raises(JaxresError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(JaxresError, match="peak_epoch must lie in"):
        TrainConfig(epochs=4, peak_epoch=5)
    with pytest.raises(JaxresError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 1})


# ------------------------------------------------------------------ test-time augmentation


def test_shift_images_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    expected = np.zeros_like(x)
    expected[:, 1:, 2:] = x[:, :-1, :-2]  # content moves down 1 and right 2
    np.testing.assert_array_equal(evaluate.shift_images(jnp.asarray(x), 1, 2), expected)
    expected = np.zeros_like(x)
    expected[:, :-1, :-1] = x[:, 1:, 1:]
    np.testing.assert_array_equal(evaluate.shift_images(jnp.asarray(x), -1, -1), expected)


def test_flip_tta_is_the_mean_of_image_and_mirror_logits():
    config = TrainConfig(width=0.0625)
    model = backends.model_from_config(config, num_classes=4)
    variables = jax.device_get(
        train.init_train_state(config, optim.make_optimizer(config, 1)[0], models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
    )
    variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    inputs = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
    plain = model.apply(variables, inputs)
    mirrored = model.apply(variables, inputs[:, :, ::-1])
    np.testing.assert_allclose(evaluate.predict_logits(model, variables, inputs, "flip"), (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    # mirror-invariant by construction
    np.testing.assert_allclose(
        evaluate.predict_logits(model, variables, inputs, "flip"),
        evaluate.predict_logits(model, variables, inputs[:, :, ::-1], "flip"),
        rtol=1e-5, atol=1e-6,
    )
    # six views: image and mirror, each unshifted and shifted by (1, 1) and (-1, -1)
    views = [evaluate.shift_images(inputs, dy, dx) for dy, dx in [(0, 0), (1, 1), (-1, -1)]]
    expected = sum(model.apply(variables, v) + model.apply(variables, v[:, :, ::-1]) for v in views) / 6
    np.testing.assert_allclose(evaluate.predict_logits(model, variables, inputs, "flip_translate"), expected, rtol=1e-5, atol=1e-6)


def test_evaluate_in_steps_and_scan_modes_agree_and_count_every_image(finished_run, dataset):
    model, variables, config = evaluate.load_for_inference(finished_run.config.workdir)
    mesh = parallel.make_mesh()
    results = {}
    for loop in ("steps", "scan"):
        evaluate_test = evaluate.make_evaluate(model, dataclasses.replace(config, epoch_loop=loop, eval_batch_size=16), mesh)
        results[loop] = jax.device_get(evaluate_test(variables, dataset.test.images, dataset.test.labels))
    assert results["steps"]["predictions"].shape == (40,)  # 40 images in batches of 16: the last is padded
    np.testing.assert_array_equal(results["steps"]["predictions"], results["scan"]["predictions"])
    assert results["steps"]["accuracy"] == pytest.approx(np.mean(results["steps"]["predictions"] == dataset.test.labels))
    assert results["steps"]["loss"] == pytest.approx(results["scan"]["loss"], rel=1e-5)


@pytest.mark.slow  # 20-35 s for whichever mix runs first (the second then takes 2-3 s)
@pytest.mark.parametrize("mix", ["ricap", "cutmix"])
def test_mixing_step_trains_on_mixed_soft_labels(mix):
    """A step with label mixing runs, is finite, and its loss is the cross-entropy against
    the mixed soft labels (not the hard ones)."""
    config = TrainConfig(width=0.0625, batch_size=8, epochs=1, peak_epoch=0, mix=mix, crop_padding=0, flip=False, cutout_size=0)
    model = backends.model_from_config(config, num_classes=4)
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch=10)
    state = train.init_train_state(config, optimizer, models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    labels = jnp.arange(8) % 4
    key = jax.random.PRNGKey(3)
    new_state, metrics = train.train_step(state, images, labels, key, model=model, optimizer=optimizer, config=config)
    assert bool(metrics["finite"])
    from jaxres import augment

    mixed, targets = augment.mix_batch(jax.random.fold_in(key, 1), images, jax.nn.one_hot(labels, 4), mix)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = model.apply(variables, augment.normalize(mixed), train=True, mutable=["batch_stats"])
    expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, 0.2)).mean()
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_states_of_two_runs_compare_which_flax_train_state_would_not_allow():
    """Why `train.TrainState` is not flax's `train_state.TrainState`: flax's keeps the optimizer
    as static pytree data, so two runs' states (equal optimizers, distinct objects) have
    different tree structures; jaxres's states compare leaf by leaf."""
    from flax.training import train_state

    config = TrainConfig(width=0.0625, epochs=1)
    params = {"w": jnp.ones(3)}
    first, second = optim.make_optimizer(config, 10)[0], optim.make_optimizer(config, 10)[0]
    flax_states = [train_state.TrainState.create(apply_fn=None, params=params, tx=tx) for tx in (first, second)]
    assert jax.tree_util.tree_structure(flax_states[0]) != jax.tree_util.tree_structure(flax_states[1])
    ours = [train.init_train_state(config, tx, {"params": params}) for tx in (first, second)]
    assert jax.tree_util.tree_structure(ours[0]) == jax.tree_util.tree_structure(ours[1])
    chex.assert_trees_all_equal(*ours)
