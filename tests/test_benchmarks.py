"""The benchmark suite's own tests (small sizes): same model and recipe on both sides, the
weights round trip, the statistics and ratio arithmetic, the report rendering."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import common, plans, processes, report, rows, run, torch_train  # noqa: E402
from benchmarks.torch_reference import CustomResNet as TorchResNet  # noqa: E402

WIDTH = 0.0625
REPO = Path(__file__).resolve().parents[1]


def torch_model_with_random_statistics(seed: int = 0, width: float = WIDTH):
    """A PyTorch CustomResNet with non-trivial BatchNorm affines and running statistics."""
    torch.manual_seed(seed)
    model = TorchResNet(width=width)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("norm.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean") or name.endswith("norm.bias"):
                tensor.normal_(0.0, 0.2)
    return model


def images_uint8(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- same model, same recipe


def test_both_sides_build_the_same_model():
    import jax

    from jaxres import augment, backends, convert
    from jaxres.config import TrainConfig
    from jaxres.models import count_params

    torch_model = torch_model_with_random_statistics().eval()
    config = TrainConfig(width=WIDTH)
    flax_model = backends.model_from_config(config, num_classes=10)
    variables = convert.torch_to_flax(torch_model.state_dict(), flax_model)
    assert count_params(variables["params"]) == sum(p.numel() for p in torch_model.parameters())

    images = images_uint8(16)
    recipe = torch_train.Recipe(width=WIDTH, channels_last=True)
    torch_model = torch_model.to(memory_format=torch.channels_last)
    inputs = torch_train.to_model_input(torch_train.normalize(torch.from_numpy(images).permute(0, 3, 1, 2)), recipe)
    with torch.no_grad():
        expected = torch_model(inputs).numpy()
    got = np.asarray(jax.jit(lambda v, x: flax_model.apply(v, augment.normalize(x), train=False))(variables, images))
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    # the two normalisations agree too
    np.testing.assert_allclose(
        inputs.permute(0, 2, 3, 1).numpy(), np.asarray(augment.normalize(images)), atol=1e-5
    )


def test_weights_round_trip_through_the_shared_npz(tmp_path):
    from jaxres import backends, convert
    from jaxres.config import TrainConfig

    from benchmarks import worker_torch

    arrays = {"train_images": images_uint8(1024)}
    args = SimpleNamespace(seed=3, width=WIDTH, norm="batch", weights=str(tmp_path / "w.npz"))
    state = worker_torch.make_weights(args, arrays)
    loaded = worker_torch.load_weights(args.weights)
    assert set(loaded) == set(state)
    assert float(np.abs(loaded["prep.conv_block.norm.running_mean"]).max()) > 0  # calibrated, not the fresh zeros
    model = backends.model_from_config(TrainConfig(width=WIDTH), num_classes=10)
    back = convert.flax_to_torch(convert.torch_to_flax(loaded, model), model)
    assert set(back) == set(loaded)
    for name, array in loaded.items():
        if name.endswith("num_batches_tracked"):
            continue  # exported as 0 by design
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    fresh = TorchResNet(width=WIDTH)
    fresh.load_state_dict({k: torch.as_tensor(v) for k, v in back.items()}, strict=True)


@pytest.mark.slow
def two_training_steps(dtype):
    """The same two steps from the same weights on the same batches (no augmentation) in
    PyTorch's recipe and in jaxres.train.train_step, computing in `dtype` (float32 or
    float64). Returns ([(jaxres loss, torch loss)] per step, jaxres state_dict after the
    steps, torch state_dict after the steps, the initial state_dict)."""
    import jax
    import jax.numpy as jnp

    from jaxres import convert, models, optim, train
    from jaxres.config import TrainConfig

    steps_per_epoch, epochs = 2, 2  # peak at step round(5/24 * 2 * 2) = 1: the 2nd step has LR peak_lr
    torch_dtype = {jnp.float32: torch.float32, jnp.float64: torch.float64}[dtype]
    torch_model = torch_model_with_random_statistics(seed=1).to(torch_dtype)
    config = TrainConfig(width=WIDTH, epochs=epochs, batch_size=32, crop_padding=0, flip=False, cutout_size=0)
    flax_model = models.create_model(config.model, num_classes=10, width=WIDTH, dtype=dtype)
    variables = convert.torch_to_flax(torch_model.state_dict(), flax_model)
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), variables)
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch)
    state = train.init_train_state(config, optimizer, variables)
    step = jax.jit(lambda s, x, y: train.train_step(s, x, y, jax.random.PRNGKey(0), model=flax_model, optimizer=optimizer, config=config))

    recipe = torch_train.Recipe(width=WIDTH, epochs=epochs, batch_size=32, channels_last=False)
    trainer = torch_train.Trainer(torch_model, recipe, steps_per_epoch, torch.device("cpu"))
    schedule = trainer.schedule
    trainer.schedule = lambda step: float(np.float32(schedule(step)))  # optax evaluates the LR in float32
    numpy_dtype = np.dtype(dtype)
    mean = np.asarray(torch_train.CIFAR10_MEAN, numpy_dtype) * 255
    inverse_std = 1 / (np.asarray(torch_train.CIFAR10_STD, numpy_dtype) * 255)
    rng = np.random.default_rng(0)
    losses = []
    for index in range(2):
        images = images_uint8(32, seed=10 + index)
        labels = rng.integers(0, 10, 32).astype(np.int32)
        state, metrics = step(state, images, labels)
        # normalised in the compute dtype, as jaxres.augment.normalize does
        inputs = torch.from_numpy((images.astype(numpy_dtype) - mean) * inverse_std).permute(0, 3, 1, 2).contiguous()
        loss, _ = trainer.step(inputs, torch.from_numpy(labels.astype(np.int64)))
        losses.append((float(metrics["loss"]), float(loss)))
    assert trainer.step_count == 2
    got = convert.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats}, flax_model)
    return losses, got, torch_model.state_dict(), convert.flax_to_torch(variables, flax_model)


def test_two_training_steps_match_jaxres():
    """Same weights, same batches, no augmentation: the PyTorch recipe (SGD Nesterov, coupled
    weight decay, label smoothing, one-cycle LR per step, BatchNorm momentum) and
    jaxres.train.train_step give the same parameters and running statistics.

    Checked in float64, where the two frameworks' different convolution algorithms leave
    differences of ~1e-15: in float32 these are ~1e-7, and the second step can move an
    activation across a ReLU or max-pool kink, which changes one gradient entry by a step
    (seen on an Intel Xeon: a layer1 weight 3.8e-5 apart after two steps) without either
    side being wrong. In float32 the losses (continuous in the weights) are compared.
    """
    import jax
    import jax.numpy as jnp

    for jaxres_loss, torch_loss in two_training_steps(jnp.float32)[0]:
        assert jaxres_loss == pytest.approx(torch_loss, rel=1e-5)
    with jax.enable_x64(True):
        losses, got, expected, initial = two_training_steps(jnp.float64)
    for jaxres_loss, torch_loss in losses:
        assert jaxres_loss == pytest.approx(torch_loss, rel=1e-12)
    moved = 0
    for name, array in got.items():
        if name.endswith("num_batches_tracked"):
            continue
        reference = expected[name].numpy()
        if name.endswith("running_var"):
            # PyTorch updates running_var with the unbiased batch variance (x n/(n-1)), Flax with
            # the biased one: n = 32 x 4 x 4 = 512 values per channel at layer3 here, a 0.2%
            # difference in the update, ~1e-4 after two steps of momentum 0.1.
            np.testing.assert_allclose(array, reference, rtol=1e-3, err_msg=name)
            continue
        np.testing.assert_allclose(array, reference, atol=1e-9 * max(1.0, np.abs(reference).max()), rtol=0, err_msg=name)
        moved += not np.allclose(reference, initial[name])
    assert moved > 0  # the second step (LR > 0) changed the weights on both sides


def test_one_cycle_schedule_matches_jaxres():
    from jaxres import optim

    for total, peak in [(24, 5), (100, 21), (10, 0), (7, 7)]:
        schedule = optim.one_cycle_lr(0.4, total, peak)
        for step in range(total + 3):
            assert torch_train.one_cycle_lr(step, 0.4, total, peak) == pytest.approx(float(schedule(step)), abs=1e-7), (total, peak, step)
    recipe = torch_train.Recipe(epochs=24)
    schedule = torch_train.make_schedule(recipe, steps_per_epoch=10)
    assert schedule(0) == 0.0 and schedule(50) == pytest.approx(0.4) and schedule(240) == 0.0


def test_train_subset_is_a_seeded_sorted_sample_and_needs_no_jax():
    """Both workers draw the training subset with jaxres.data.select_train_subset, which the
    PyTorch worker imports without jax."""
    from jaxres.data import select_train_subset

    labels = np.zeros(1000, np.int32)
    np.testing.assert_array_equal(select_train_subset(labels, None, 4), np.arange(1000))
    np.testing.assert_array_equal(select_train_subset(labels, 5000, 4), np.arange(1000))
    for subset in (10, 999):
        chosen = select_train_subset(labels, subset, 4)
        assert chosen.shape == (subset,) and np.all(np.diff(chosen) > 0) and chosen.max() < 1000
        np.testing.assert_array_equal(chosen, select_train_subset(labels, subset, 4))
        assert not np.array_equal(chosen, select_train_subset(labels, subset, 5))
    code = "import sys, jaxres.data; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run(precision):
    """The AMP code paths (autocast; GradScaler for fp16) that the GPU suite uses, on the CPU."""
    recipe = torch_train.Recipe(width=WIDTH, batch_size=16, precision=precision, channels_last=True)
    model = torch_train.build_model(recipe, torch.device("cpu"))
    trainer = torch_train.Trainer(model, recipe, steps_per_epoch=4, device=torch.device("cpu"), allow_cpu_amp=True)
    assert (trainer.scaler is not None) == (precision == "fp16")
    images = torch.from_numpy(images_uint8(64))
    batches = torch_train.device_batches(images, torch.arange(64) % 10, recipe, torch.Generator().manual_seed(0))
    metrics = torch_train.train_steps(trainer, batches, 3)
    assert np.isfinite(metrics["loss"]) and trainer.step_count == 3
    result = torch_train.evaluate(model, images, torch.arange(64) % 10, recipe)
    assert 0.0 <= result["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="GPU only"):
        torch_train.Trainer(model, recipe, 4, torch.device("cpu"))


def test_flip_tta_logits_match_jaxres():
    """The converged row's TTA: the PyTorch side's flip (mean of the logits of image and mirror)
    is jaxres.evaluate's on the same weights and images; "none" is the plain forward."""
    import jax

    from jaxres import augment, backends, convert, evaluate
    from jaxres.config import TrainConfig

    torch_model = torch_model_with_random_statistics(seed=2).eval()
    flax_model = backends.model_from_config(TrainConfig(width=WIDTH), num_classes=10)
    variables = convert.torch_to_flax(torch_model.state_dict(), flax_model)
    images = images_uint8(16, seed=5)
    recipe = torch_train.Recipe(width=WIDTH, channels_last=True)
    torch_model = torch_model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = torch_train.predict_logits(torch_model, torch.from_numpy(images), recipe, "none").numpy()
        flipped = torch_train.predict_logits(torch_model, torch.from_numpy(images), recipe, "flip").numpy()
        mirror = torch_train.predict_logits(torch_model, torch.from_numpy(images[:, :, ::-1].copy()), recipe, "none").numpy()
    np.testing.assert_allclose(flipped, (plain + mirror) / 2, rtol=0, atol=1e-6)
    expected = np.asarray(jax.jit(lambda v, x: evaluate.predict_logits(flax_model, v, augment.normalize(x), "flip"))(variables, images))
    np.testing.assert_allclose(flipped, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    assert not np.allclose(flipped, plain)  # the mirror changes the logits
    labels = torch.from_numpy(expected.argmax(1).astype(np.int64))
    result = torch_train.evaluate(torch_model, torch.from_numpy(images), labels, recipe, tta="flip")
    assert result["accuracy"] == 1.0  # its predictions are jaxres's flip TTA's
    with pytest.raises(ValueError, match="tta must be one of"):
        torch_train.predict_logits(torch_model, torch.from_numpy(images), recipe, "flip_translate")


# --------------------------------------------------------------------------- augmentation


def test_device_and_per_sample_augmentations_keep_the_image_and_cut_one_square():
    images = np.full((64, 32, 32, 3), 255, np.uint8)
    generator = torch.Generator().manual_seed(0)
    out = torch_train.augment_batch(torch.from_numpy(images), generator, padding=0, flip=True, cutout=8).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal((out == 0).all(-1).sum((1, 2)), np.full(64, 64))  # exactly one 8x8 square
    rng = np.random.default_rng(0)
    for image in images[:8]:
        one = torch_train.augment_one(image, rng, padding=0, cutout=8)
        assert (one == 0).all(-1).sum() == 64
    # crops shift the content: with padding only, every zero pixel lies in a border band of width <= 4
    gradient = np.broadcast_to(np.arange(1, 33, dtype=np.uint8)[None, :, None], (32, 32, 3)).copy()
    shifted = torch_train.augment_batch(torch.from_numpy(np.stack([gradient] * 32)), generator, padding=4, flip=False, cutout=0).numpy()
    offsets = {int(row[0, 16, 0]) - 17 for row in shifted if row[0, 16, 0] > 0}
    assert offsets <= set(range(-4, 5)) and len(offsets) > 1
    flipped = torch_train.augment_batch(torch.from_numpy(np.stack([gradient] * 64)), generator, padding=0, flip=True, cutout=0).numpy()
    firsts = set(flipped[:, 0, 0, 0].tolist())
    assert firsts == {1, 32}  # some mirrored, some not


def test_loader_batches_are_normalised_chw():
    images = images_uint8(256)
    labels = np.arange(256, dtype=np.int32) % 10
    recipe = torch_train.Recipe(width=WIDTH, batch_size=64, channels_last=True)
    loader = torch_train.make_loader(images, labels, recipe, num_workers=0, device=torch.device("cpu"))
    inputs, targets = next(torch_train.loader_batches(loader, recipe, torch.device("cpu")))
    assert inputs.shape == (64, 3, 32, 32) and inputs.dtype == torch.float32
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert targets.dtype == torch.int64
    assert -2.5 < float(inputs.min()) < -1.5 and 1.5 < float(inputs.max()) < 2.5  # (0 - mean)/std and (255 - mean)/std


# --------------------------------------------------------------------------- statistics and ratios


def test_summary_and_pairwise_ratio_arithmetic():
    s = common.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert common.summarize([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    assert common.pairwise_ratios([2, 4, 6], [1, 2, 4]) == [2.0, 2.0, 1.5]
    r = common.ratio_summary([2, 4, 6], [1, 2, 4])
    assert (r["median"], r["min"], r["max"], r["n"]) == (2.0, 1.5, 2.0, 3)
    # the median of pairwise ratios is not the ratio of medians
    a, b = [10.0, 10.0, 30.0], [5.0, 20.0, 10.0]
    assert common.ratio_summary(a, b)["median"] == 2.0
    assert common.summarize(a)["median"] / common.summarize(b)["median"] == 1.0
    assert common.throughputs([{"images": 512, "seconds": 2.0}, {"images": 100, "seconds": 0.5}]) == [256.0, 200.0]
    with pytest.raises(ValueError):
        common.pairwise_ratios([1, 2], [1])
    with pytest.raises(ValueError):
        common.pairwise_ratios([1], [0])
    with pytest.raises(ValueError):
        common.summarize([])


def test_the_machine_record_names_the_cpus_vector_extensions():
    """Two CPUs named "AMD EPYC" were an AVX2 and an AVX-512 machine: the record says which."""
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\ncpu family\t: 6\nflags\t\t: amx_tile avx2\n"
    )
    assert common.cpu_features(cpuinfo) == {"family": "25", "model": "1", "features": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert common.cpu_features("processor\t: 0\nflags\t\t: sse2\n")["features"] == []
    assert common.cpu_features("processor\t: 0\nFeatures\t: fp asimd\n") == {}  # an ARM CPU: unknown


def fake_raw() -> dict:
    def worker(seconds, first, memory):
        return {
            "ready": {"event": "ready", "first_call_seconds": first, "compile_seconds": first - 1},
            "measurements": [{"event": "measurement", "images": 100, "seconds": s} for s in seconds],
            "memory": {"event": "finished", "peak_rss_mib": memory},
        }

    return {"jax": worker([1.0, 2.0, 1.0], 11.0, 300.0), "torch-device": worker([2.0, 2.0, 4.0], 3.0, 200.0)}


def test_summarize_workers_ratios_pair_by_pair():
    workers, ratios, memory = rows.summarize_workers(fake_raw(), device="cpu")
    assert workers["jax"]["throughput"]["values"] == [100.0, 50.0, 100.0]
    ratio = ratios["jax/torch-device"]
    assert ratio["values"] == [2.0, 1.0, 4.0] and ratio["median"] == 2.0  # (100/50, 50/50, 100/25)
    assert memory["jax/torch-device"] == 1.5
    assert workers["jax"]["first_call_overhead_seconds"] == 10.0  # 11 - median(1, 2, 1)
    assert workers["torch-device"]["first_call_overhead_seconds"] == 1.0


# --------------------------------------------------------------------------- report


def fake_results() -> dict:
    workers, ratios, memory = rows.summarize_workers(fake_raw(), device="cpu")
    return {
        "name": "test",
        "created": "2026-01-01T00:00:00+00:00",
        "suite": "cpu",
        "mode": "quick",
        "device": "cpu",
        "plan": {"repeats": 3, "warmup": 2},
        "machine": {"cpu_model": "Test CPU", "cpu_cores": 2, "cores_available": 2, "memory_gib": 8, "gpus": [],
                    "python": "3.11", "load_average_at_start": [0.5, 0, 0], "load_average_at_end": [1.5, 0, 0]},
        "packages": {"jax": "0.1", "torch": "2.0"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "threads": {"per_worker": 2},
        "parity": [{"width": 0.25, "images": 64, "max_abs_logit": 1.0, "max_abs_difference": 1e-7, "relative_difference": 1e-7,
                    "argmax_agreement": 1.0, "cam_max_abs_difference": 2e-6, "passed": True}],
        "rows": [
            {"task": "train", "name": "train w0.25 b128 fp32", "setting": {"width": 0.25, "batch": 128, "precision": "fp32", "steps": 6},
             "workers": workers, "ratios": ratios, "memory_ratios": memory},
            {"task": "accuracy", "name": "time to accuracy w0.25 2 epochs",
             "setting": {"width": 0.25, "epochs": 2, "train_subset": 8192, "batch": 512, "precision": "fp32", "target": None},
             "workers": {f: {"final_accuracy": common.summarize([acc]), "wall_seconds": common.summarize([wall]), "seconds_to_target": [None],
                             "memory_mib": 100.0, "compile_seconds": 5.0}
                         for f, acc, wall in (("jax", 0.5, 30.0), ("torch", 0.45, 20.0))},
             "ratios": {"wall_seconds jax/torch": common.ratio_summary([30.0], [20.0])}},
            {"task": "gradcam", "name": "gradcam w1", "setting": {"width": 1.0, "gradcam_images": 8, "gradcam_batch": 8}, "skipped": "time budget used up"},
        ],
        "notes": ["a note"],
    }


def test_markdown_report_states_ratios_and_machine(tmp_path):
    results = fake_results()
    text = report.markdown(results)
    assert "| train | width 0.25, batch 128, fp32, 6 steps/run | 100 (50.0–100) | 50.0 (25.0–50.0) | tensors on device | **2.00** (1.00–4.00) | – |" in text
    assert "| width 0.25, 8192 train images, 2 epochs, batch 512, fp32 | 50.00% | 45.00% | 30.0 | 20.0 | 1.50 | – |" in text
    assert "Test CPU (2 cores" in text and "commit 0123456789ab" in text
    assert "gradcam w1: time budget used up" in text
    assert "| train w0.25 b128 fp32 | 300 | tensors on device | 200 | 1.50 |" in text
    lines = report.ratio_lines(results)
    assert "- train w0.25 b128 fp32, throughput jax/torch-device: 2.000 (min 1.000, max 4.000, n=3)" in lines
    assert any(line.startswith("- time to accuracy w0.25 2 epochs, wall_seconds jax/torch: 1.500") for line in lines)
    section = report.readme_section(results)
    assert section.startswith("## Results\n") and "python -m benchmarks.run --quick" in section and "Test CPU" in section
    path = tmp_path / "ratios.png"
    assert report.plot_ratios(results, path) and path.stat().st_size > 1000
    assert [e[0] for e in report.chart_entries(results)] == ["train w0.25 b128 fp32 vs device", "time to accuracy w0.25 2 epochs (1 / wall ratio)"]
    assert report.chart_entries(results)[1][1] == pytest.approx(20.0 / 30.0)


def fake_training_run(framework: str, seed: int, tta: bool = True) -> dict:
    """A worker's `accuracy` result, its accuracies set by framework and seed."""
    accuracy = {"jax": 0.86, "torch": 0.87}[framework] + 0.01 * seed
    run = {"final_accuracy": accuracy, "wall_seconds": 100.0 + 10 * seed + (framework == "jax"), "seconds_to_target": None,
           "train_images": 1024, "test_images": 10000, "peak_rss_mib": 500.0, "compile_seconds": 3.0, "seed": seed}
    if tta:
        run.update(tta="flip", final_tta_accuracy=accuracy + 0.004 * (1 + seed) * (framework == "jax"))
    return run


CONVERGED = rows.TrainingRuns("converged", "converged w0.25 24 epochs", 0.25, 24, None, 512, "fp32", None, 2, "flip")


def fake_converged_row() -> dict:
    runs = {f: [fake_training_run(f, seed) for seed in (0, 1)] for f in ("jax", "torch")}
    return rows.summarize_training_runs(CONVERGED, runs, "cpu")


def test_report_renders_the_converged_row():
    row = fake_converged_row()
    runs = row["runs"]
    assert row["setting"]["tta"] == "flip" and row["setting"]["seeds"] == [0, 1]
    assert row["workers"]["jax"]["final_tta_accuracy"]["median"] == pytest.approx(0.871)
    difference = row["paired_difference"]
    assert difference["final_accuracy"]["mean"] == pytest.approx(-0.01) and difference["final_accuracy"]["standard_error"] == pytest.approx(0)
    assert difference["final_tta_accuracy"]["values"] == pytest.approx([-0.006, -0.002])
    results = fake_results()
    results["rows"].append(row)
    results["rows"].append({"task": "converged", "name": "converged w0.5 24 epochs", "setting": CONVERGED.setting(),
                            "error": "incomplete: 1 of 4 runs recorded (continue with --resume)", "runs": {"jax": [runs["jax"][0]], "torch": []}})
    results["resumed"] = [{"from": "benchmarks/results/x.json", "at": "2026-01-02T00:00:00+00:00", "previous_git": {"commit": "abcdef0123456789"},
                           "kept": ["converged w0.25 24 epochs: jax seed 0"]}]
    text = report.markdown(results)
    assert ("| width 0.25, all train images, 24 epochs, batch 512, fp32, TTA flip | 0, 1 | 86.50% (86.00%–87.00%) | 87.50% (87.00%–88.00%) "
            "| 87.10% (86.40%–87.80%) | 87.50% (87.00%–88.00%) | -1.00 (s.e. 0.00; per seed -1.00, -1.00); -0.40 (s.e. 0.20; per seed -0.60, -0.20) "
            "| 106 (101–111) | 105 (100–110) | **1.01** (1.01–1.01) |") in text
    assert "| 0, 1 | incomplete: 1 of 4 runs recorded (continue with --resume) |" in text
    assert "Resumed at 2026-01-02T00:00:00+00:00 from `benchmarks/results/x.json` (recorded with commit abcdef012345): kept converged w0.25 24 epochs: jax seed 0." in text
    # the time-to-accuracy table keeps its own rows only
    assert text.count("| width 0.25, 8192 train images, 2 epochs") == 1
    assert "converged w0.25 24 epochs (1 / wall ratio)" in [e[0] for e in report.chart_entries(results)]
    assert "| converged w0.25 24 epochs | 500 | device pipeline | 500 | 1.00 |" in text
    assert "**Throughput**" not in report.markdown({**fake_results(), "rows": [row]})  # a `--tasks converged` run has none


def test_report_command_writes_the_readme_section(tmp_path):
    source = tmp_path / "latest.json"
    source.write_text(json.dumps(fake_results()))
    out = tmp_path / "README_results.md"
    assert report.main([str(source), "--out", str(out)]) == 0
    assert out.read_text().startswith("## Results")
    assert report.main([str(tmp_path / "missing.json")]) == 2
    # the converged row of another run (`--tasks converged`, hours long) in the same section
    converged = {**fake_results(), "name": "cpu-full-converged", "rows": [fake_converged_row()]}
    (tmp_path / "converged.json").write_text(json.dumps(converged))
    assert report.main([str(source), "--out", str(out), "--converged-from", str(tmp_path / "converged.json")]) == 0
    section = out.read_text()
    assert "**The recipe at convergence** (measured with `python -m benchmarks.run --tasks converged` on Test CPU" in section
    assert "raw numbers: `benchmarks/results/cpu-full-converged.json`" in section
    assert "| width 0.25, all train images, 24 epochs, batch 512, fp32, TTA flip | 0, 1 | 86.50%" in section


# --------------------------------------------------------------------------- plan and protocol


def test_plans():
    parser = run.build_parser()
    quick = plans.make_plan(parser.parse_args(["--quick", "--suite", "cpu"]))
    assert (quick.widths, quick.batches, quick.precisions, quick.repeats) == ([0.25], [128], ["fp32", "bf16"], 5)
    assert quick.loader_rows == "first"  # the DataLoader pipeline is timed on the fp32 row
    assert quick.repeats >= 5 and quick.accuracy_subset and quick.accuracy_width == 0.25
    assert quick.accuracy_repeats == 3  # three seeds
    assert plans.make_plan(parser.parse_args(["--quick", "--accuracy-repeats", "6"])).accuracy_repeats == 6
    with pytest.raises(SystemExit, match="--accuracy-repeats must be at least 1"):
        plans.make_plan(parser.parse_args(["--quick", "--accuracy-repeats", "0"]))
    full = plans.make_plan(parser.parse_args(["--suite", "cpu"]))
    assert (full.widths, full.batches, full.accuracy_subset) == ([0.25, 1.0], [128, 512], None)
    # the recipe at convergence: in the full suite (last), not in --quick nor on the GPU (which has width 1)
    assert full.tasks[-1] == "converged" and "converged" not in quick.tasks
    assert (full.converged_width, full.converged_epochs, full.converged_subset, full.converged_batch) == (0.25, 24, None, 512)
    assert full.converged_seeds >= 2 and full.converged_tta == "flip"
    only = plans.make_plan(parser.parse_args(["--suite", "cpu", "--tasks", "converged", "--converged-seeds", "3"]))
    assert only.tasks == ["converged"] and only.converged_seeds == 3
    smoke = plans.make_plan(parser.parse_args(["--suite", "cpu", "--smoke"]))
    assert "converged" in smoke.tasks and (smoke.converged_epochs, smoke.converged_subset, smoke.converged_seeds) == (1, 1024, 2)
    with pytest.raises(SystemExit, match="--converged-seeds must be at least 1"):
        plans.make_plan(parser.parse_args(["--converged-seeds", "0"]))
    # a recorded plan comes back from its JSON (the widths of train_images_per_measure as floats again)
    assert plans.plan_from_record(json.loads(json.dumps(dataclasses.asdict(full)))) == full
    with pytest.raises(SystemExit, match="lacks converged_batch"):
        plans.plan_from_record({k: v for k, v in dataclasses.asdict(full).items() if k != "converged_batch"})
    gpu = plans.make_plan(parser.parse_args(["--suite", "gpu"]))
    assert "converged" not in gpu.tasks
    assert gpu.precisions == ["fp16", "bf16", "fp32"] and gpu.accuracy_epochs == 24 and gpu.accuracy_target == 0.94
    assert gpu.budget_seconds and gpu.budget_seconds < 600
    # the plan fits its budget by the per-row estimates; with torch.compile and width 0.25 it did not
    estimate = plans.estimated_gpu_seconds(gpu)
    assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total") <= gpu.budget_seconds
    wider = plans.make_plan(parser.parse_args(["--suite", "gpu", "--widths", "1", "0.25", "--batches", "512", "128", "--torch-compile"]))
    assert plans.estimated_gpu_seconds(wider)["total"] > gpu.budget_seconds
    smoke_on_cpu = plans.make_plan(parser.parse_args(["--suite", "gpu", "--device", "cpu", "--smoke"]))
    # on a CPU: bf16 through PyTorch's CPU autocast, no fp16 (a GPU's)
    assert smoke_on_cpu.precisions == ["bf16", "fp32"] and smoke_on_cpu.accuracy_precision == "fp32"


def test_protocol_lines_round_trip():
    line = common.MARKER + json.dumps({"event": "ready", "x": 1})
    assert common.parse_message(line) == {"event": "ready", "x": 1}
    assert common.parse_message("some library chatter\n") is None
    # a token without "--" would make XLA drop every flag after it: never passed on
    env = common.thread_environment(3, {"XLA_FLAGS": "--xla_foo=1 intra_op_parallelism_threads=9 --xla_bar=2"})
    assert env["OMP_NUM_THREADS"] == "3" and env["XLA_FLAGS"].split() == [
        "--xla_foo=1", "--xla_bar=2", "--xla_cpu_multi_thread_eigen=true"]


class StubRunner(processes.Runner):
    """A `Runner` whose workers are stubs (no processes): parity writes the weights and answers
    the same logits for both sides, accuracy answers `fake_training_run`. Each accuracy run
    is recorded in `calls` with the number of runs the results file held when it started;
    the run numbered `interrupt_at` raises KeyboardInterrupt (Ctrl-C during a worker)."""

    calls: list = []
    interrupt_at: int | None = None
    results_file: Path | None = None

    def one_shot(self, label, framework, task, options, timeout=None):
        if task == "parity":
            if options.get("save_weights"):
                Path(options["weights"]).parent.mkdir(parents=True, exist_ok=True)
                np.savez(options["weights"], weight=np.arange(6.0).reshape(2, 3))
            return {"logits": [[0.1, 0.7]], "cams": [[[0.5]]], "parameters": 6}
        assert task == "accuracy" and options["tta"] == "flip" and options["epochs"] == 1
        recorded = 0
        if self.results_file.is_file():
            row = json.loads(self.results_file.read_text())["rows"][-1]
            recorded = sum(len(runs) for runs in row["runs"].values())
        StubRunner.calls.append((framework, options["seed"], recorded))
        if len(StubRunner.calls) == StubRunner.interrupt_at:
            raise KeyboardInterrupt
        return {"event": "result", **fake_training_run(framework, options["seed"])}


def test_converged_row_resumes_an_interrupted_run(tmp_path, monkeypatch):
    """The results file is written after every run of the converged row; interrupted during
    its third run, `--resume FILE` keeps the two runs recorded (same plan, framework, seed and
    weights), measures only the missing two, and records that it resumed and from what."""
    monkeypatch.setattr(run, "Runner", StubRunner)
    monkeypatch.setattr(run, "resolve_data", lambda path, cache_dir, log: ("stub", {"source": "stub"}, None))
    StubRunner.results_file = tmp_path / "converged.json"
    StubRunner.calls, StubRunner.interrupt_at = [], 3
    argv = ["--suite", "cpu", "--smoke", "--tasks", "converged", "--name", "converged", "--out", str(tmp_path), "--no-chart"]
    assert run.main(argv) == 130
    # seed 0 on both sides, then seed 1: each run saw the runs before it already in the file
    assert StubRunner.calls == [("jax", 0, 0), ("torch", 0, 1), ("jax", 1, 2)]
    interrupted = json.loads(StubRunner.results_file.read_text())
    row = interrupted["rows"][-1]
    assert row["task"] == "converged" and row["error"].startswith("incomplete: 2 of 4 runs")
    assert [(f, r["seed"]) for f, runs in row["runs"].items() for r in runs] == [("jax", 0), ("torch", 0)]
    assert "--resume" in interrupted["interrupted"]

    with pytest.raises(SystemExit, match="drop --tasks"):  # the plan is the file's
        run.main(["--resume", str(StubRunner.results_file), "--tasks", "train"])
    StubRunner.calls, StubRunner.interrupt_at = [], None
    assert run.main(["--resume", str(StubRunner.results_file), "--no-chart"]) == 0
    assert StubRunner.calls == [("jax", 1, 2), ("torch", 1, 3)]  # only the missing runs
    results = json.loads(StubRunner.results_file.read_text())
    assert (results["name"], results["created"], results["plan"]) == (interrupted["name"], interrupted["created"], interrupted["plan"])
    assert results["parity"][0]["weights_created"] is False  # the recorded runs' weights, reused
    row = results["rows"][-1]
    assert "error" not in row and row["setting"]["seeds"] == [0, 1]
    assert [r.get("kept_from") for r in row["runs"]["jax"]] == ["converged.json", None]
    assert row["workers"]["torch"]["final_accuracy"]["values"] == [0.87, 0.88]
    assert row["paired_difference"]["final_tta_accuracy"]["values"] == pytest.approx([-0.006, -0.002])
    (resumed,) = results["resumed"]
    assert resumed["from"] == str(StubRunner.results_file) and resumed["previous_interrupted"] == interrupted["interrupted"]
    assert resumed["kept"] == ["converged w0.0625 1 epochs: jax seed 0", "converged w0.0625 1 epochs: torch seed 0"]
    assert json.loads((tmp_path / "latest.json").read_text()) == results
    assert "Resumed at" in (tmp_path / "README_results.md").read_text()


def test_gpu_script_dry_run():
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout[out.stdout.index("{"):])
    assert plan["suite"] == "gpu" and plan["accuracy_epochs"] == 24


@pytest.mark.slow
def test_end_to_end_smoke(tmp_path):
    """Orchestrator, workers of both frameworks, parity check and outputs, on toy sizes."""
    code = run.main(["--quick", "--smoke", "--tasks", "parity", "gradcam", "--data", "synthetic", "--out", str(tmp_path), "--no-chart"])
    assert code == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["parity"][0]["passed"]
    row = results["rows"][0]
    assert row["task"] == "gradcam" and row["ratios"]["jax/torch"]["n"] == 2
    assert "other_cpu_cores" in row["workers"]["jax"]  # the contention probe ran
    assert (tmp_path / "README_results.md").read_text().startswith("## Results")


def test_cam_gallery_figure_has_one_column_per_method_and_deprocess_stays_in_range():
    """benchmarks/cam_gallery.py's figure and its guided-image display, on made-up maps."""
    from benchmarks import cam_gallery

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    columns = {"gradcam": np.random.default_rng(1).random((2, 8, 8)), "Guided Grad-CAM": np.random.default_rng(2).normal(size=(2, 8, 8, 3))}
    columns["Guided Grad-CAM"] = np.stack([cam_gallery.deprocess(image) for image in columns["Guided Grad-CAM"]])
    assert columns["Guided Grad-CAM"].min() >= 0 and columns["Guided Grad-CAM"].max() <= 1
    figure = cam_gallery.plot_gallery(images, columns, ["a", "b"], np.array([0, 1]), "title")
    assert len(figure.axes) == 2 * 3


def test_the_machine_record_says_how_malloc_is_set_in_the_runs(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("JAXRES_MALLOC", "system")
    assert common.malloc_record() == {"jaxres": "JAXRES_MALLOC=system", "GLIBC_TUNABLES": None}
    monkeypatch.delenv("JAXRES_MALLOC")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    assert common.malloc_record() == {
        "jaxres": "the user's own malloc settings (GLIBC_TUNABLES)", "GLIBC_TUNABLES": "glibc.malloc.arena_max=1"
    }  # fmt: skip
