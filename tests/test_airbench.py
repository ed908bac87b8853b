"""The airbench94 recipe's parts (`--preset airbench94`), each against an independent
reference: NumPy for the whitening, lookahead, flips, TTA and schedule, and a PyTorch twin of
legacy/airbench94.py's network, optimizer and loop (written anew here from its description)
for a whole short run from the same weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import airbench, augment, backends, config as config_lib, evaluate, models, optim, train
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError


def small_airbench(**overrides) -> TrainConfig:
    values = dict(width=0.25, batch_size=32, crop_padding=0, flip=False, workdir="unused")
    return config_lib.airbench94(**{**values, **overrides})


# --------------------------------------------------------------------------- whitening


def test_whitened_patch_covariance_is_the_identity_on_the_whitened_directions():
    rng = np.random.default_rng(0)
    # correlated channels and neighbouring pixels, so that whitening has work to do
    base = rng.normal(size=(64, 9, 9, 3))
    mixed = base @ np.array([[1.0, 0.6, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    images = mixed + 0.8 * np.roll(mixed, 1, axis=1) + 0.5 * np.roll(mixed, 1, axis=2)
    kernel = airbench.whitening_kernel(images)
    assert kernel.shape == (2, 2, 3, 24)
    # the patches in the kernel's (dy, dx, c) order, built here independently
    patches = np.stack(
        [images[:, dy : dy + 8, dx : dx + 8, c] for dy in (0, 1) for dx in (0, 1) for c in range(3)], axis=-1
    ).reshape(-1, 12)
    covariance = patches.T @ patches / len(patches)
    eigenvalues = np.linalg.eigvalsh(covariance)[::-1]
    filters = kernel.reshape(12, 24).astype(np.float64)
    whitened = patches @ filters[:, :12]
    whitened_covariance = whitened.T @ whitened / len(whitened)
    expected = np.diag(eigenvalues / (eigenvalues + airbench.WHITENING_EPS))
    np.testing.assert_allclose(whitened_covariance, expected, atol=1e-4)
    assert np.all(eigenvalues > 100 * airbench.WHITENING_EPS)  # so every direction is whitened
    np.testing.assert_allclose(whitened_covariance, np.eye(12), atol=1e-2)
    np.testing.assert_array_equal(filters[:, 12:], -filters[:, :12])  # the +/- pairs


def test_whitening_layer_computes_the_kernel_on_every_2x2_patch():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    layer = models.Whitening()
    variables = layer.init(jax.random.PRNGKey(0), images)
    kernel = rng.normal(size=(2, 2, 3, 24)).astype(np.float32)
    bias = rng.normal(size=(24,)).astype(np.float32)
    out = np.asarray(layer.apply({"params": {"kernel": kernel, "bias": bias}}, images))
    reference = np.asarray(
        jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ) + bias
    assert out.shape == (2, 4, 5, 24) and variables["params"]["kernel"].shape == (2, 2, 3, 24)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_whitening_sample_is_the_start_of_the_fixed_shuffle():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    sample = airbench.whitening_sample(images, count=7)
    order = np.random.default_rng(0).permutation(40)
    np.testing.assert_array_equal(sample[:, 0, 0, 0], order[:7])


def test_whitening_init_writes_the_kernel_into_the_model():
    model = models.create_model("airbench94", width=0.25)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    images = np.random.default_rng(2).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    whitened = airbench.init_whitening(variables, images)
    expected = airbench.whitening_kernel(np.asarray(augment.normalize(airbench.whitening_sample(images))))
    np.testing.assert_array_equal(whitened["params"]["whiten"]["kernel"], expected)
    assert whitened["params"]["block1"] is variables["params"]["block1"]


# --------------------------------------------------------------------------- network


def test_dirac_init_is_the_identity_map_on_the_first_filters():
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (2, 6, 6, 5))
    for channels_out in (8, 5, 3):
        conv = models.nn.Conv(channels_out, (3, 3), padding=1, use_bias=False, kernel_init=models.dirac_kernel_init())
        variables = conv.init(key, x)
        y = np.asarray(conv.apply(variables, x))
        n = min(5, channels_out)
        np.testing.assert_array_equal(y[..., :n], np.asarray(x)[..., :n])
        if channels_out > 5:  # the other filters keep PyTorch's default init
            kernel = np.asarray(variables["params"]["kernel"])
            assert np.abs(kernel[..., 5:]).max() > 0 and np.abs(kernel[..., 5:]).max() <= 1 / math.sqrt(45)


def test_airbench_shapes_parameters_and_frozen_batchnorm_scale():
    model = models.create_model("airbench94")
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    params = variables["params"]
    assert models.count_params(params) == 1_971_640
    assert "scale" not in params["block1"]["norm1"] and set(params["block1"]["norm1"]) == {"bias"}
    assert params["head"]["kernel"].shape == (256, 10) and "bias" not in params["head"]
    assert model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 10)
    assert model.apply(variables, jnp.zeros((1, 28, 28, 3))).shape == (1, 10)  # 27 -> 13 -> 6 -> 3 -> 1
    with pytest.raises(JaxresError, match="norm 'group'"):
        models.init_variables(models.create_model("airbench94", norm="group"), jax.random.PRNGKey(0))


def test_airbench_batchnorm_running_average_momentum_is_pytorchs_0_4():
    norm = models.BatchNorm(use_running_average=False, momentum=0.6, epsilon=1e-12, use_scale=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2)) * 3 + 1
    variables = norm.init(jax.random.PRNGKey(1), x)
    _, updates = norm.apply(variables, x, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 2)
    # PyTorch's BatchNorm2d(momentum=0.4): new = (1 - 0.4) * old + 0.4 * batch (old mean 0, var 1),
    # the running variance from the unbiased batch variance (36 values per channel here)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.4 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.6 + 0.4 * flat.var(0, ddof=1), rtol=1e-5)
    torch = pytest.importorskip("torch")
    twin = torch.nn.BatchNorm2d(2, eps=1e-12, momentum=0.4)
    twin(torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2)).float())
    np.testing.assert_allclose(updates["batch_stats"]["mean"], twin.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], twin.running_var.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- optimizer


def test_decoupled_hyperparameters_equal_the_published_conversion():
    # legacy/airbench94.py, main(): kilostep_scale = 1024 * (1 + 1 / (1 - momentum)),
    # lr = hyp lr / kilostep_scale, wd = hyp wd * batch_size / kilostep_scale, and
    # torch.optim.SGD(weight_decay=wd / lr) on a loss summed over the batch
    converted = optim.decoupled_sgd(11.5, 0.0153, 0.85, 1024)
    kilostep_scale = 1024 * (1 + 1 / (1 - 0.85))
    assert converted["torch_lr"] == 11.5 / kilostep_scale
    assert converted["torch_weight_decay"] == (0.0153 * 1024 / kilostep_scale) / (11.5 / kilostep_scale)
    np.testing.assert_allclose(converted["torch_lr"], 0.00146484375 * 1.0, rtol=1e-3)  # 11.5 / 7850.67
    # on a mean loss: the same step, lr * batch_size on the mean gradient and wd / batch_size coupled
    np.testing.assert_allclose(converted["lr"], 11.5 / kilostep_scale * 1024, rtol=1e-15)
    np.testing.assert_allclose(converted["lr"] * converted["weight_decay"], 0.0153 * 1024 / kilostep_scale, rtol=1e-14)


def test_schedule_equals_the_published_get_lr():
    config = small_airbench()
    steps_per_epoch = 48  # 50,000 // 1,024
    total = config.total_steps(steps_per_epoch)
    assert total == math.ceil(48 * 9.9) == 476
    _, schedule = optim.make_optimizer(config, steps_per_epoch)
    peak = optim.decoupled_sgd(11.5, 0.0153, 0.85, config.batch_size)["lr"]
    warmup = int(total * 0.23)

    def get_lr(step):  # legacy/airbench94.py, main()
        if step < warmup:
            frac = step / warmup
            return 0.2 * (1 - frac) + 1.0 * frac
        frac = (step - warmup) / (total - warmup)
        return 1.0 * (1 - frac) + 0.07 * frac

    ours = np.array([schedule(step) for step in range(total)])
    np.testing.assert_allclose(ours, peak * np.array([get_lr(step) for step in range(total)]), rtol=2e-6)


def test_the_lr_peaks_where_airbench_ends_its_warmup_at_any_step_count():
    for steps_per_epoch in (1, 2, 3, 7, 48, 97):
        config = small_airbench()
        total = math.ceil(9.9 * steps_per_epoch)
        assert config.peak_step(steps_per_epoch) == int(total * 0.23)  # legacy/airbench94.py get_lr's warmup_steps
        _, schedule = optim.make_optimizer(config, steps_per_epoch)
        peak = optim.decoupled_sgd(11.5, 0.0153, 0.85, config.batch_size)["lr"]
        assert float(schedule(int(total * 0.23))) == pytest.approx(peak, rel=1e-6)
    # round(0.23 * 9.9 * 2) = 5, where airbench's int(0.23 * 20) = 4: the fraction, not the epoch, decides
    assert small_airbench().peak_step(2) == 4
    # a peak given in epochs replaces the preset's fraction; both at once are refused
    assert small_airbench(peak_epoch=1.0).peak_step(10) == 10
    with pytest.raises(JaxresError, match="peak_epoch .* and peak_fraction .* both place the LR peak"):
        TrainConfig(peak_epoch=1.0, peak_fraction=0.2)
    with pytest.raises(JaxresError, match="peak_fraction must lie in"):
        TrainConfig(peak_fraction=1.5)
    from jaxres import cli

    parser = cli.train_parser()
    given = cli.config_from_args(parser.parse_args(["--preset", "airbench94", "--peak-epoch", "2"]))[0]
    assert (given.peak_epoch, given.peak_fraction) == (2.0, None)
    assert cli.config_from_args(parser.parse_args(["--preset", "airbench94"]))[0].peak_fraction == 0.23
    # its convolutions: Winograd's on a CPU, direct on a GPU (`auto`), and direct when asked
    assert cli.config_from_args(parser.parse_args(["--preset", "airbench94"]))[0].conv_algorithm == "auto"
    direct = cli.config_from_args(parser.parse_args(["--preset", "airbench94", "--conv-algorithm", "direct"]))[0]
    assert direct.conv_algorithm == "direct" and backends.for_config(direct).name == backends.resolve(direct.conv_backend).name


def test_fractional_epochs_count_steps_as_airbench():
    config = small_airbench()
    assert config.epoch_count == 10
    assert [config.steps_in_epoch(e, 48) for e in range(10)] == [48] * 9 + [476 - 9 * 48]
    with pytest.raises(JaxresError, match="epochs"):
        TrainConfig(epochs=0.0)


def _grouped_step(config, steps_per_epoch, step_count, grads, params):
    optimizer, schedule = optim.make_optimizer(config, steps_per_epoch)
    state = optimizer.init(params)
    for _ in range(step_count):
        updates, state = optimizer.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return params, schedule


def test_param_groups_norm_bias_lr_whitening_bias_freeze_and_frozen_kernel():
    config = small_airbench(whiten_bias_epochs=1)
    params = {
        "whiten": {"kernel": jnp.ones((2, 2, 3, 24)), "bias": jnp.ones(24)},
        "block1": {"norm1": {"bias": jnp.ones(4)}, "conv1": {"kernel": jnp.ones((3, 3, 24, 4))}},
    }
    assert optim.param_groups(params) == {
        "whiten": {"kernel": "frozen", "bias": "whiten_bias"},
        "block1": {"norm1": {"bias": "norm_bias"}, "conv1": {"kernel": "default"}},
    }
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    one, schedule = _grouped_step(config, 2, 1, grads, params)
    lr = float(schedule(0))
    wd = optim.decoupled_sgd(11.5, 0.0153, 0.85, 32)["weight_decay"]
    np.testing.assert_array_equal(one["whiten"]["kernel"], params["whiten"]["kernel"])
    # first Nesterov step: update = (1 + momentum) * (g + wd * p)
    np.testing.assert_allclose(one["block1"]["conv1"]["kernel"], 1 - lr * 1.85 * (1 + wd), rtol=1e-6)
    np.testing.assert_allclose(one["block1"]["norm1"]["bias"], 1 - 64 * lr * 1.85 * (1 + wd / 64), rtol=1e-6)
    np.testing.assert_allclose(one["whiten"]["bias"], 1 - lr * 1.85 * (1 + wd), rtol=1e-6)
    # whiten_bias_epochs=1 of 2 steps: steps 3 and 4 leave the whitening bias where step 2 put it
    two, _ = _grouped_step(config, 2, 2, grads, params)
    four, _ = _grouped_step(config, 2, 4, grads, params)
    np.testing.assert_array_equal(four["whiten"]["bias"], two["whiten"]["bias"])
    assert not np.allclose(four["block1"]["conv1"]["kernel"], two["block1"]["conv1"]["kernel"])


def test_default_recipe_keeps_the_plain_sgd_chain():
    optimizer, _ = optim.make_optimizer(TrainConfig(), 10)
    state = optimizer.init({"w": jnp.ones(3)})
    assert not any("MultiTransform" in type(s).__name__ for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "_fields")))


def test_still_groups_take_no_gradient_and_the_updates_stay_the_same():
    """`optim.still_groups`: the frozen kernel always, the whitening bias from its freeze on.
    A run whose steps stop those gradients makes the same parameters as one that does not,
    and its traced step has no backward pass for them: the kernel's patch product goes, and
    after the freeze block1.conv1's input gradient too (XLA convolutions, so the counts are
    the jaxpr's on every CPU; direct ones, whose gradients autodiff writes, not Winograd's)."""
    import functools

    config = small_airbench(whiten_bias_epochs=1, conv_backend="xla", conv_algorithm="direct")
    assert optim.still_groups(TrainConfig(), 5) == frozenset()
    assert optim.still_groups(config, 0) == {"frozen"}
    assert optim.still_groups(config, 1) == optim.still_groups(config, 7) == {"frozen", "whiten_bias"}
    model = backends.model_from_config(config, 10)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 32, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (4, 32)).astype(np.int32)
    variables = airbench.init_whitening(models.init_variables(model, jax.random.PRNGKey(0)), images[0])
    optimizer, _ = optim.make_optimizer(config, 2)  # 2 steps per epoch: the bias freezes after step 2

    def step(still):
        return functools.partial(
            train.train_step, model=model, optimizer=optimizer, config=config, steps_per_epoch=2, still=still
        )

    start = train.init_train_state(config, optimizer, variables)
    counts = {}
    for name, still in (("none", frozenset()), ("kernel", optim.still_groups(config, 0)), ("both", optim.still_groups(config, 1))):
        text = str(jax.make_jaxpr(step(still))(start, images[0], labels[0], jax.random.PRNGKey(0)))
        counts[name] = (text.count("conv_general_dilated["), text.count("dot_general["))
    assert counts["none"][0] == counts["kernel"][0] == counts["both"][0] + 1 == 3 * 6  # block1.conv1's input gradient
    assert counts["none"][1] == counts["kernel"][1] + 1  # the whitening kernel's gradient
    assert train.train_step.__kwdefaults__["still"] is None  # default: epoch 0's groups

    def run(still_of_epoch):
        state, compiled = start, {}
        for i in range(4):
            still = still_of_epoch(i // 2)
            compiled.setdefault(still, jax.jit(step(still)))
            state, _ = compiled[still](state, images[i], labels[i], jax.random.PRNGKey(i))
        return jax.device_get(state.params)

    plain, stopped = run(lambda epoch: frozenset()), run(lambda epoch: optim.still_groups(config, epoch))
    for ours, theirs in zip(jax.tree_util.tree_leaves(stopped), jax.tree_util.tree_leaves(plain)):
        # the same operations on the gradients that remain: equal up to XLA's fusion choices
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * max(np.abs(theirs).max(), 1e-3))


# --------------------------------------------------------------------------- lookahead


def test_lookahead_equals_a_numpy_reference():
    every, decay, total = 5, 0.95, 12
    rng = np.random.default_rng(4)
    weights = [rng.normal(size=3).astype(np.float32) for _ in range(total + 1)]
    # NumPy, as legacy/airbench94.py's training loop: after each step s (from 1) the weights
    # are what the optimizer made (here given); every 5 steps average.lerp_(w, 1 - d), w <- average
    average = weights[0].astype(np.float64).copy()
    expected = []
    for step in range(1, total + 1):
        w = weights[step].astype(np.float64)
        if step % every == 0:
            d = decay**every * (step / total) ** 3
            average = average + (1 - d) * (w - average)
            w = average.copy()
        if step >= total:
            w = average.copy()
        expected.append(w)
    ours_average = {"w": jnp.asarray(weights[0])}
    for step in range(1, total + 1):
        ours_average, current = optim.lookahead_update(
            jnp.asarray(step), total, every, decay, ours_average, {"w": jnp.asarray(weights[step])}
        )
        np.testing.assert_allclose(current["w"], expected[step - 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours_average["w"], average, rtol=1e-6)


# --------------------------------------------------------------------------- augmentation


def test_alternating_flip_flips_each_image_on_exactly_every_other_epoch():
    key = jax.random.PRNGKey(5)
    indices = jnp.arange(1000)
    flips = np.stack([np.asarray(augment.alternating_flips(key, indices, jnp.asarray(e))) for e in range(6)])
    assert np.all(flips[1:] != flips[:-1])  # each image changes every epoch: flipped every other one
    assert np.all(flips[0::2] == flips[0]) and np.all(flips[1::2] == ~flips[0])
    assert 400 < flips[0].sum() < 600  # a random half in even epochs
    # a batch order does not matter: the coins belong to the images
    shuffled = np.asarray(augment.alternating_flips(key, indices[::-1], jnp.asarray(3)))
    np.testing.assert_array_equal(shuffled, flips[3][::-1])


def test_alternating_flip_in_the_train_step_follows_the_epoch():
    config = small_airbench(flip=True, alternating_flip=True, lookahead_every=0)
    images = jnp.asarray(np.random.default_rng(6).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
    seen = {}

    class Stop(Exception):
        pass

    def fake_augment(key, batch, crop_padding, flip, cutout_size, crop_mode, flips):
        seen["flips"] = flips
        raise Stop

    state = train.TrainState(jnp.asarray(7), {}, {}, (), None)
    original = augment.augment_batch
    try:
        augment.augment_batch = fake_augment
        with pytest.raises(Stop):
            train.train_step(state, images, jnp.zeros(4, jnp.int32), jax.random.PRNGKey(0), model=None,
                             optimizer=None, config=config, indices=jnp.arange(4), steps_per_epoch=3)  # fmt: skip
    finally:
        augment.augment_batch = original
    flip_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), train.ALTERNATING_FLIP_STREAM)
    np.testing.assert_array_equal(seen["flips"], augment.alternating_flips(flip_key, jnp.arange(4), jnp.asarray(2)))


def _windows_equal_to(view, padded_image, padding: int = 2) -> list[tuple[int, int]]:
    """The offsets (dy, dx) in [0, 2 * padding] at which `padded_image` holds `view`: [H, W, C]."""
    height, width = view.shape[:2]
    offsets = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    return [(dy, dx) for dy, dx in offsets if np.array_equal(view, padded_image[dy : dy + height, dx : dx + width])]


def test_an_airbench_epoch_sees_each_image_once_translated_uniformly_and_flipped_by_its_coin(monkeypatch):
    """The data path of the compiled epoch itself (`make_train_epoch`, shuffle, gather, the
    augmentation inside `train_step`), two epochs of the preset's augmentation: each image once
    an epoch, each a reflect-padded window shifted by -2..2 pixels both ways (all 25 shifts,
    none favoured), mirrored exactly when its coin says in even epochs and when it does not
    in odd ones (legacy/airbench94.py: a random half pre-flipped, all flipped every other epoch)."""
    from jaxres import parallel
    from tests.helpers import random_dataset

    seen = {"out": [], "flips": []}
    real_augment, real_flips = augment.augment_batch, augment.alternating_flips

    def capture_augment(key, images, *args):
        out = real_augment(key, images, *args)
        jax.debug.callback(lambda o: seen["out"].append(np.asarray(o)), out)
        return out

    def capture_flips(key, indices, epoch):
        flips = real_flips(key, indices, epoch)
        jax.debug.callback(lambda i, e, f: seen["flips"].append((np.asarray(i), int(e), np.asarray(f))), indices, epoch, flips)
        return flips

    monkeypatch.setattr(augment, "augment_batch", capture_augment)
    monkeypatch.setattr(augment, "alternating_flips", capture_flips)
    config = config_lib.airbench94(width=0.0625, batch_size=32, workdir="unused", lookahead_every=0)
    dataset = random_dataset(num_train=256 + 16)  # 8 full batches; 16 images left out of each epoch
    mesh = parallel.make_mesh()
    model = backends.model_from_config(config, 4)
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch=8)
    state = parallel.replicate_tree(mesh, train.init_train_state(config, optimizer, models.init_variables(model, jax.random.PRNGKey(0))))
    train_epoch = train.make_train_epoch(model, optimizer, config, mesh, 8)
    images, labels = parallel.replicate(mesh, dataset.train.images), parallel.replicate(mesh, dataset.train.labels)
    for epoch in range(2):
        state, _ = train_epoch(state, images, labels, train.epoch_key(jax.random.PRNGKey(3), epoch))
    jax.effects_barrier()
    assert len(seen["out"]) == len(seen["flips"]) == 16

    source = dataset.train.images
    padded = np.pad(source, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")  # torch's 'reflect'
    coin_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), train.ALTERNATING_FLIP_STREAM)
    coins = np.asarray(real_flips(coin_key, jnp.arange(len(source)), jnp.asarray(0)))
    shifts = np.zeros((5, 5), int)
    for step, (out, (indices, epoch, flips)) in enumerate(zip(seen["out"], seen["flips"])):
        assert epoch == step // 8
        np.testing.assert_array_equal(flips, coins[indices] ^ (epoch % 2 == 1))
        for image, index, flipped in zip(out, indices, flips):
            view = image[:, ::-1] if flipped else image
            found = _windows_equal_to(view, padded[index])
            assert len(found) == 1, f"image {index} in epoch {epoch} is no (mirrored) window of its padded source"
            shifts[found[0]] += 1
    for epoch in range(2):
        indices = np.concatenate([i for i, e, _ in seen["flips"] if e == epoch])
        assert len(set(indices.tolist())) == 256  # no image twice in an epoch
    assert shifts.min() > 0 and shifts.sum() == 512
    # uniform over the 25 shifts: Pearson's chi-square, 24 degrees of freedom, p > 1e-4 (deterministic seeds)
    chi_square = ((shifts - 512 / 25) ** 2 / (512 / 25)).sum()
    assert chi_square < 61.1, shifts


def test_reflect_crop_pads_with_mirrored_edges():
    images = jnp.asarray(np.random.default_rng(7).integers(0, 256, (64, 5, 6, 2)), jnp.uint8)
    out = np.asarray(augment.random_crop(jax.random.PRNGKey(0), images, 2, "reflect"))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")  # torch's 'reflect'
    found = set()
    for n in range(64):
        matches = _windows_equal_to(out[n], padded[n])
        assert matches, f"image {n} is no window of the reflect-padded image"
        found.update(matches)
    assert len(found) > 15  # offsets spread over the 25 windows
    with pytest.raises(JaxresError, match="crop padding mode"):
        augment.random_crop(jax.random.PRNGKey(0), images, 2, "wrap")


# --------------------------------------------------------------------------- TTA


def test_tta_level_2_equals_a_numpy_reference():
    rng = np.random.default_rng(8)
    inputs = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    weights = rng.normal(size=(6 * 6 * 2, 4)).astype(np.float32)

    class Linear:  # a model whose logits are a fixed linear map of the pixels
        def apply(self, variables, x, train=False):
            return jnp.asarray(x).reshape(x.shape[0], -1) @ weights

    def net(x):
        return x.reshape(x.shape[0], -1) @ weights

    def mirror(x):  # legacy/airbench94.py infer_mirror
        return 0.5 * net(x) + 0.5 * net(x[:, :, ::-1])

    padded = np.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    translated = [padded[:, 0:6, 0:6], padded[:, 2:8, 2:8]]
    expected = 0.5 * mirror(inputs) + 0.5 * np.mean([mirror(t) for t in translated], axis=0)
    ours = np.asarray(evaluate.predict_logits(Linear(), None, jnp.asarray(inputs), "flip_translate_reflect"))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- against a PyTorch twin


def _torch_twin(params, width_channels):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
            self.pool = nn.MaxPool2d(2)
            self.norm1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
            self.norm2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
            self.activ = nn.GELU()
            for norm in (self.norm1, self.norm2):
                norm.weight.requires_grad = False

        def forward(self, x):
            x = self.activ(self.norm1(self.pool(self.conv1(x))))
            return self.activ(self.norm2(self.conv2(x)))

    class Mul(nn.Module):
        def forward(self, x):
            return x / 9

    c1, c2, c3 = width_channels
    net = nn.Sequential(
        nn.Conv2d(3, 24, 2, padding=0, bias=True), nn.GELU(),
        Block(24, c1), Block(c1, c2), Block(c2, c3), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(c3, 10, bias=False), Mul(),
    ).double()  # fmt: skip
    to = lambda a, axes: torch.tensor(np.asarray(a, np.float64).transpose(axes))  # noqa: E731
    with torch.no_grad():
        net[0].weight.copy_(to(params["whiten"]["kernel"], (3, 2, 0, 1)))
        net[0].bias.copy_(to(params["whiten"]["bias"], (0,)))
        for index, name in zip((2, 3, 4), ("block1", "block2", "block3")):
            block = params[name]
            net[index].conv1.weight.copy_(to(block["conv1"]["kernel"], (3, 2, 0, 1)))
            net[index].conv2.weight.copy_(to(block["conv2"]["kernel"], (3, 2, 0, 1)))
            net[index].norm1.bias.copy_(to(block["norm1"]["bias"], (0,)))
            net[index].norm2.bias.copy_(to(block["norm2"]["bias"], (0,)))
        net[7].weight.copy_(to(params["head"]["kernel"], (1, 0)))
    net[0].weight.requires_grad = False
    return net


def test_a_whole_short_run_equals_a_pytorch_twin_with_the_published_loop():
    """A whole 40-step run (4 steps per epoch, 9.9 epochs): schedule, both parameter groups,
    the whitening bias frozen after epoch 1, lookahead every 5 steps and after the last, and
    BatchNorm's running statistics, against the twin driven by legacy/airbench94.py's loop."""
    torch = pytest.importorskip("torch")
    config = small_airbench(whiten_bias_epochs=1, batch_size=16)
    batch, steps_per_epoch = config.batch_size, 4
    total = config.total_steps(steps_per_epoch)
    assert total == 40 and config.peak_step(steps_per_epoch) == int(40 * 0.23) == 9
    model = backends.model_from_config(config, 10)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (total, batch, 32, 32, 3)).astype(np.uint8)
    # labels from the mean brightness: a task the steps learn; on random labels 40 steps at
    # airbench's LR make float32 and float64 drift apart (chaos, not a difference of recipe)
    labels = (images.reshape(total, batch, -1).mean(-1).astype(np.int64) % 10).astype(np.int32)
    variables = airbench.init_whitening(variables, images[0])
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch)
    state = train.init_train_state(config, optimizer, variables)
    net = _torch_twin(jax.device_get(state.params), (16, 64, 64))
    step = jax.jit(lambda s, x, y: train.train_step(s, x, y, jax.random.PRNGKey(0), model=model, optimizer=optimizer,
                                                    config=config, steps_per_epoch=steps_per_epoch))  # fmt: skip

    # legacy/airbench94.py main(), for this batch size and run length
    kilostep_scale = 1024 * (1 + 1 / (1 - 0.85))
    lr, wd = 11.5 / kilostep_scale, 0.0153 * batch / kilostep_scale
    lr_biases = lr * 64
    norm_biases = [p for k, p in net.named_parameters() if ".norm" in k and p.requires_grad]
    other = [p for k, p in net.named_parameters() if ".norm" not in k and p.requires_grad]
    torch_optimizer = torch.optim.SGD(
        [dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases), dict(params=other, lr=lr, weight_decay=wd / lr)],
        momentum=0.85, nesterov=True,
    )  # fmt: skip
    warmup = int(total * 0.23)
    get_lr = lambda s: 0.2 * (1 - s / warmup) + s / warmup if s < warmup else (1 - (s - warmup) / (total - warmup)) + 0.07 * (s - warmup) / (total - warmup)  # noqa: E731, E501
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, get_lr)
    alpha_schedule = 0.95**5 * (torch.arange(total + 1, dtype=torch.float64) / total) ** 3
    average = {k: v.clone() for k, v in net.state_dict().items()}

    def lookahead(decay):  # LookaheadState.update: every float tensor of the state_dict
        for (name, kept), current in zip(average.items(), net.state_dict().values()):
            if current.is_floating_point():
                kept.lerp_(current, 1 - decay)
                current.copy_(kept)

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    net.train()
    done = 0
    for epoch in range(math.ceil(9.9)):
        net[0].bias.requires_grad = epoch < config.whiten_bias_epochs
        for _ in range(steps_per_epoch):
            inputs = torch.tensor(np.asarray(augment.normalize(images[done]), np.float64).transpose(0, 3, 1, 2))
            loss = loss_fn(net(inputs), torch.tensor(labels[done], dtype=torch.long)).sum()
            torch_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch_optimizer.step()
            scheduler.step()
            state, _ = step(state, jnp.asarray(images[done]), jnp.asarray(labels[done]))
            done += 1
            if done % 5 == 0:
                lookahead(alpha_schedule[done].item())
            if done >= total:
                lookahead(1.0)
                break
    assert int(state.step) == total

    params, stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
    pairs = [(params["whiten"]["bias"], net[0].bias), (params["head"]["kernel"].T, net[7].weight)]
    for index, name in zip((2, 3, 4), ("block1", "block2", "block3")):
        for conv in ("conv1", "conv2"):
            pairs.append((params[name][conv]["kernel"].transpose(3, 2, 0, 1), getattr(net[index], conv).weight))
        for norm in ("norm1", "norm2"):
            twin = getattr(net[index], norm)
            pairs += [(params[name][norm]["bias"], twin.bias), (stats[name][norm]["mean"], twin.running_mean),
                      (stats[name][norm]["var"], twin.running_var)]  # fmt: skip
    for ours, theirs in pairs:
        theirs = theirs.detach().numpy()
        # float32 (jaxres) against float64 (the twin), 40 steps from the same start; a biased
        # running variance would be off by 1/143 in block3 (16 images x 3 x 3 values)
        scale = max(np.abs(theirs).max(), 1e-3)
        np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, atol=2e-4 * scale)
    np.testing.assert_array_equal(params["whiten"]["kernel"], variables["params"]["whiten"]["kernel"])
    # the whitening bias moved in epoch 1 only, and the weights end as the lookahead average
    assert not np.allclose(params["whiten"]["bias"], variables["params"]["whiten"]["bias"])


# --------------------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_airbench_run_fractional_epochs_final_tta_and_bit_exact_resume(tmp_path):
    from tests.helpers import quiet, random_dataset, stop_after_first_epoch

    dataset = random_dataset(num_train=128, num_test=40)

    def config(workdir):
        return config_lib.airbench94(
            width=0.125, batch_size=32, epochs=1.5, peak_epoch=0.3, eval_batch_size=20, whiten_bias_epochs=1,
            workdir=str(workdir), misclassified_to_plot=4,
        )  # fmt: skip

    whole = train.train_and_evaluate(config(tmp_path / "whole"), dataset=dataset, progress=False, log=quiet)
    assert [row["epoch"] for row in whole.history] == [1, 2]
    assert int(whole.state.step) == 6  # ceil(1.5 * 4)
    last = whole.history[-1]
    assert last["final_tta"] == "flip_translate_reflect" and 0 <= last["final_tta_accuracy"] <= 1
    # after the last step the weights are the lookahead average
    chex_equal = jax.tree_util.tree_map(np.array_equal, whole.state.params, whole.state.lookahead["params"])
    assert all(jax.tree_util.tree_leaves(chex_equal))

    stopped = config(tmp_path / "stopped")
    train.train_and_evaluate(stopped, dataset=dataset, progress=False, log=quiet, on_epoch=stop_after_first_epoch)
    resumed = train.train_and_evaluate(stopped, resume=True, dataset=dataset, progress=False, log=quiet)
    same = jax.tree_util.tree_map(
        np.array_equal, jax.device_get(whole.state), jax.device_get(resumed.state)
    )
    assert all(jax.tree_util.tree_leaves(same))
    assert resumed.history[-1]["final_tta_accuracy"] == last["final_tta_accuracy"]
