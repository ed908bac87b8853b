"""The LR range test: the curve's shape on a learnable task, the smoothing, the suggestion, the CLI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from matplotlib.figure import Figure

from jaxres import cli, lr_find
from jaxres.config import TrainConfig
from jaxres.data import Dataset, Split
from jaxres.errors import JaxresError

NUM_CLASSES = 5
MIN_LR, MAX_LR, STEPS = 1e-3, 1e3, 120
CONFIG = TrainConfig(data="colours", model="custom_resnet", width=0.0625, batch_size=32, seed=0)


def colour_dataset(count: int = 512, seed: int = 0) -> Dataset:
    """Noisy images whose class is their tint: learnable by a tiny model within a few dozen steps."""
    rng = np.random.default_rng(seed)
    tints = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])
    labels = rng.integers(0, NUM_CLASSES, count).astype(np.int32)
    images = 0.6 * tints[labels][:, None, None, :] + 50 + rng.normal(0, 40, (count, 32, 32, 3))
    split = Split(np.clip(images, 0, 255).astype(np.uint8), labels)
    return Dataset(split, split, tuple(f"tint{i}" for i in range(NUM_CLASSES)), "colours")


@pytest.fixture(scope="module")
def dataset():
    return colour_dataset()


@pytest.fixture(scope="module")
def result(dataset):
    return lr_find.range_test_for_config(CONFIG, dataset, min_lr=MIN_LR, max_lr=MAX_LR, steps=STEPS)


def test_the_suggestion_lies_inside_the_swept_range(result):
    assert MIN_LR <= result.lrs[0] <= result.suggested_lr <= result.lrs[-1] <= MAX_LR
    assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)


def test_the_curve_starts_at_the_initial_loss_falls_then_diverges(result):
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses) >= 20
    np.testing.assert_allclose(result.lrs, lr_find.exponential_lrs(MIN_LR, MAX_LR, STEPS)[: len(result.lrs)])
    # the fresh model predicts (nearly) uniformly: the first loss is about log K
    assert result.losses[0] == pytest.approx(math.log(NUM_CLASSES), abs=0.15)
    smoothed = result.smoothed_losses
    lowest = int(np.argmin(smoothed))
    assert 0.1 * len(smoothed) < lowest < len(smoothed) - 1, "the minimum should lie inside the sweep"
    assert smoothed[lowest] < smoothed[0] - 0.3, "the loss should fall at moderate LRs"
    # at the high end the loss rises until the sweep stops (smoothed > 4 x its best)
    assert result.stopped_early and len(result.lrs) < STEPS
    assert smoothed[-1] > smoothed[lowest] + 0.3 and result.losses[lowest:].max() > 2 * math.log(NUM_CLASSES)


def test_smoothing_is_the_bias_corrected_ema(result):
    reference, average = [], 0.0
    for i, loss in enumerate(result.losses):
        average = 0.98 * average + 0.02 * loss
        reference.append(average / (1 - 0.98 ** (i + 1)))
    np.testing.assert_allclose(result.smoothed_losses, reference, rtol=1e-12)
    np.testing.assert_allclose(lr_find.smooth_losses([3.0, 1.0], 0.5), [3.0, (0.25 * 3 + 0.5) / 0.75])


def test_suggest_lr_divides_the_minimum_and_clips_to_the_range():
    lrs = lr_find.exponential_lrs(1e-3, 1.0, 4)  # 1e-3, 1e-2, 1e-1, 1
    assert lr_find.suggest_lr(lrs, [3.0, 2.0, 1.0, 5.0]) == pytest.approx(1e-2)
    assert lr_find.suggest_lr(lrs, [1.0, 2.0, 3.0, 5.0]) == pytest.approx(1e-3)  # clipped up to the first LR
    assert lr_find.suggest_lr(lrs, [3.0, 2.0, 1.0, 5.0], divisor=3) == pytest.approx(0.1 / 3)


def test_a_sweep_that_never_turns_is_flagged(result):
    assert not lr_find.still_falling_at_the_end(result)
    falling = np.linspace(2.0, 1.0, 50)
    flat = lr_find.LRFindResult(lr_find.exponential_lrs(1e-3, 1, 50), falling, falling, 0.1, 1.0, False)
    assert lr_find.still_falling_at_the_end(flat)


def test_step_optimizer_is_the_training_sgd():
    """The sweep's optimizer, its LR set in the state (inject_hyperparams), equals coupled weight
    decay + Nesterov SGD written out with optax's primitives at that LR."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    reference = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.3, momentum=0.9, nesterov=True))
    ours = lr_find._optimizer(0.9, True, 5e-4)
    ours_params, ours_state = params, ours.init(params)
    ref_params, ref_state = params, reference.init(params)
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
        ours_state.hyperparams["learning_rate"] = jnp.float32(0.3)
        updates, ours_state = ours.update(grads, ours_state, ours_params)
        ours_params = optax.apply_updates(ours_params, updates)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    np.testing.assert_allclose(ours_params["w"], ref_params["w"], rtol=1e-6, atol=1e-7)


def test_suggest_peak_lr_and_the_plot(dataset, result, tmp_path):
    # same model and batch shape as the fixture: the compiled step is reused
    lr = lr_find.suggest_peak_lr(CONFIG, dataset, min_lr=1e-2, max_lr=1.0, steps=6)
    assert 1e-2 <= lr <= 1.0
    figure = lr_find.plot_lr_range(result)
    assert isinstance(figure, Figure) and figure.axes[0].get_xscale() == "log"
    figure.savefig(tmp_path / "lr_find.png")
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert set(result.to_dict()) == set(result._fields)


def test_impossible_arguments_are_named(dataset):
    images, labels = dataset.train.images[:8], dataset.train.labels[:8]
    call = lambda **kw: lr_find.lr_range_test(None, {}, images, labels, key=jax.random.PRNGKey(0), **kw)  # noqa: E731
    with pytest.raises(JaxresError, match="0 < min_lr < max_lr"):
        call(min_lr=1.0, max_lr=0.1)
    with pytest.raises(JaxresError, match="batch_size must lie in"):
        call(batch_size=9)
    with pytest.raises(JaxresError, match="at least 2 steps"):
        call(steps=1)
    with pytest.raises(JaxresError, match="finite 0 < min_lr < max_lr"):
        call(max_lr=float("inf"))
    with pytest.raises(JaxresError, match="at most 100000"):
        call(steps=10**11)


def test_cli_prints_the_suggestion_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "plot.png"
    code = cli.lr_find_main(
        ["--data", "shapes", "--width", "0.0625", "--batch-size", "32", "--train-subset", "64", "--steps", "4",
         "--min-lr", "0.01", "--max-lr", "0.1", "--out", str(out)]
    )  # fmt: skip
    assert code == 0 and out.is_file()
    assert "suggested peak LR:" in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert cli.lr_find_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.lr_find_main(["--model", "vgg", "--data", "shapes"]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err


@pytest.fixture
def loaded_sources(monkeypatch):
    """The sources jaxres.data.load_dataset was asked for (it then fails with OSError)."""
    from jaxres import data

    asked = []

    def unreadable(source, **kwargs):
        asked.append(source)
        raise PermissionError(13, "Permission denied", f"{source}/train")

    monkeypatch.setattr(data, "load_dataset", unreadable)
    return asked


@pytest.mark.parametrize("out, message", [("x.txt", "has the suffix .txt"), (".", "is a folder")])
def test_cli_checks_the_output_before_the_sweep(tmp_path, capsys, loaded_sources, out, message):
    """Issue 11 item 12: --out x.txt raised ValueError after the whole sweep."""
    assert cli.lr_find_main(["--data", "somewhere", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and message in err and err.count("\n") == 1
    assert loaded_sources == []


def test_cli_reports_an_unreadable_dataset_without_traceback(tmp_path, capsys, loaded_sources):
    assert cli.lr_find_main(["--data", "/data/photos", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "error: /data/photos/train: Permission denied\n"
    assert loaded_sources == ["/data/photos"]


def test_peak_lr_takes_a_number_or_auto_and_max_lr_means_only_the_sweep_bound():
    """One meaning per flag name: --max-lr is the LR range test's last LR (python -m
    jaxres.lr_find); the trainer's peak LR is --peak-lr alone."""
    parser = cli.train_parser()
    assert parser.parse_args(["--peak-lr", "0.3"]).peak_lr == 0.3
    assert parser.parse_args(["--peak-lr", "AUTO"]).peak_lr == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--peak-lr", "fast"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-lr", "0.3"])
    assert cli.lr_find_parser().parse_args(["--max-lr", "3"]).max_lr == 3.0


@pytest.mark.slow
def test_trainer_with_peak_lr_auto_runs_the_range_test_and_trains_at_its_suggestion(tmp_path, capsys):
    import json

    workdir = tmp_path / "run"
    args = ["--data", "shapes", "--width", "0.0625", "--batch-size", "32", "--train-subset", "64",
            "--eval-batch-size", "500", "--epochs", "1", "--peak-lr", "auto", "--workdir", str(workdir)]  # fmt: skip
    assert cli.train_main(args) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert (workdir / "lr_find.png").is_file()
    out = capsys.readouterr().out
    assert f"peak LR set to {saved['peak_lr']:.4g}" in out
    assert 1e-4 <= saved["peak_lr"] <= 10.0  # inside lr_find's default sweep
    # the suggestion is the range test's for this very config (same initial model, same data)
    config = TrainConfig.from_dict({**saved, "peak_lr": TrainConfig.peak_lr})
    from jaxres import data

    assert saved["peak_lr"] == lr_find.suggest_peak_lr(config, data.load_dataset("shapes", progress=False))
    # a checkpoint there is not silently replaced by a new sweep and run
    assert cli.train_main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
