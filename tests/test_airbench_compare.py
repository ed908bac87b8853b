"""benchmarks/airbench.py, the comparison with the published airbench94: its data file, the
order and resumption of its runs, and what it reads from each side (a stand-in reference)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import airbench as compare
from jaxres import airbench


def image_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_reference_data_is_the_training_split_shuffled_once(tmp_path):
    from jaxres.data import load_dataset

    root = image_folder(tmp_path / "images")
    record = compare.write_reference_data(str(root), tmp_path / "shuffled.npz", cache_dir=str(tmp_path / "cache"))
    saved = np.load(tmp_path / "shuffled.npz")
    dataset = load_dataset(str(root), cache_dir=str(tmp_path / "cache"), progress=False)
    perm = np.random.default_rng(0).permutation(12)
    np.testing.assert_array_equal(saved["perm"], perm)
    np.testing.assert_array_equal(saved["train_images"], dataset.train.images[perm])
    np.testing.assert_array_equal(saved["train_labels"], dataset.train.labels[perm])
    np.testing.assert_array_equal(saved["test_images"], dataset.test.images)
    assert record["train"] == 12
    # the reference's first images are the ones jaxres's preset whitens with
    np.testing.assert_array_equal(saved["train_images"][:5], airbench.whitening_sample(dataset.train.images, 5))


def test_runs_alternate_and_a_resumed_comparison_skips_what_it_has(tmp_path, monkeypatch):
    assert compare.plan_runs([0, 1, 2], [0, 1]) == [
        ("reference", 0), ("jaxres", 0), ("reference", 1), ("jaxres", 1), ("jaxres", 2)
    ]  # fmt: skip
    fake = tmp_path / "fake_reference.py"
    fake.write_text(
        "import json, sys\n"
        "seed, path = int(sys.argv[1]), sys.argv[2]\n"
        "json.dump({'val_acc': 0.9 + seed / 100, 'tta_val_acc': 0.91 + seed / 100, 'total_time_seconds': 100.0 + seed,"
        " 'epoch_times': [1.0], 'val_accs': [0.9]}, open(path, 'w'))\n"
    )
    ran = []

    def fake_jaxres(args, seed, out_dir):
        ran.append(seed)
        return {"seed": seed, "accuracy": 0.92, "tta_accuracy": 0.93, "timed_seconds": 50.0, "wall_seconds_this_process": 60.0}

    monkeypatch.setattr(compare, "run_jaxres", fake_jaxres)
    (tmp_path / "data.npz").write_bytes(b"")  # present: not rewritten
    reference = f"{sys.executable} {fake} {{seed}} {{json}}"
    common = ["--reference", reference, "--npz", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out")]
    assert compare.main(["--seeds", "0", "--reference-seeds", "0", *common]) == 0
    (path,) = (tmp_path / "out").glob("airbench94-cpu-*.json")
    assert ran == [0]
    assert compare.main(["--seeds", "0", "1", "--reference-seeds", "0", "1", "--resume", str(path), *common]) == 0
    assert ran == [0, 1]  # jaxres seed 0 and reference seed 0 were kept
    results = json.loads(path.read_text())
    assert [r["seed"] for r in results["runs"]["reference"]] == [0, 1] and len(results["resumed"]) == 1
    comparison = results["comparison"]
    np.testing.assert_allclose(comparison["reference"]["tta_accuracy_mean"], 0.915)
    np.testing.assert_allclose(comparison["tta_accuracy_mean_difference_points"], 100 * (0.93 - 0.915))
    np.testing.assert_allclose(comparison["timed_seconds_ratio_jaxres_over_reference"], 50.0 / 100.5)


def test_a_comparison_interrupted_in_its_first_run_resumes_in_the_same_workdir(tmp_path, monkeypatch):
    """The results file exists before the first run ends, so `--resume` finds it and the
    interrupted jaxres run goes on in the scratch folder it started in (its checkpoints)."""
    seen = []

    def interrupted(args, seed, out_dir):
        seen.append(out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_jaxres", interrupted)
    common = ["--seeds", "0", "--out", str(tmp_path / "out")]
    with pytest.raises(KeyboardInterrupt):
        compare.main(common)
    (path,) = (tmp_path / "out").glob("airbench94-cpu-*.json")
    assert json.loads(path.read_text())["runs"] == {"jaxres": [], "reference": []}

    def finished(args, seed, out_dir):
        seen.append(out_dir)
        return {"seed": seed, "accuracy": 0.92, "tta_accuracy": 0.93, "timed_seconds": 50.0, "wall_seconds_this_process": 60.0}

    monkeypatch.setattr(compare, "run_jaxres", finished)
    assert compare.main([*common, "--resume", str(path)]) == 0
    assert seen[0] == seen[1] == tmp_path / "out" / "tmp" / path.stem
    assert [r["seed"] for r in json.loads(path.read_text())["runs"]["jaxres"]] == [0]
