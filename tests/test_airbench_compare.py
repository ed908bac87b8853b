"""benchmarks/airbench.py, the comparison with the published airbench94: its data file, the
order and resumption of its runs, and what it reads from each side (a stand-in reference)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection
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


def finished_run(seed, tta_accuracy=0.93, timed_seconds=50.0):
    """What `run_jaxres` returns for a finished run (the keys the comparison reads)."""
    return {"seed": seed, "accuracy": tta_accuracy - 0.01, "tta_accuracy": tta_accuracy, "timed_seconds": timed_seconds,
            "wall_seconds_this_process": timed_seconds + 10}  # fmt: skip


FAKE_REFERENCE = (
    "import json, sys\n"
    "seed, path = int(sys.argv[1]), sys.argv[2]\n"
    "json.dump({'val_acc': 0.9 + seed / 100, 'tta_val_acc': 0.91 + seed / 100, 'total_time_seconds': 100.0 + seed,"
    " 'epoch_times': [1.0], 'val_accs': [0.9]}, open(path, 'w'))\n"
)


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
    fake.write_text(FAKE_REFERENCE)
    ran = []

    def fake_jaxres(args, seed, out_dir):
        ran.append(seed)
        return finished_run(seed)

    monkeypatch.setattr(compare, "run_jaxres", fake_jaxres)
    (tmp_path / "data.npz").write_bytes(b"")  # present: not rewritten
    reference = f"{sys.executable} {fake} {{seed}} {{json}}"
    common = ["--reference", reference, "--npz", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out")]
    assert compare.main(["--seeds", "0", "--reference-seeds", "0", *common]) == 0
    (path,) = (tmp_path / "out").glob("airbench94-cpu-*.json")
    assert ran == [0]
    assert compare.main(["--seeds", "0", "1", "--reference-seeds", "0", "1", "--resume", str(path), *common]) == 0
    assert ran == [0, 1]  # jaxres seed 0 and reference seed 0 were kept
    assert path.with_suffix(".png").stat().st_size > 0  # the figure beside the results
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
        return finished_run(seed)

    monkeypatch.setattr(compare, "run_jaxres", finished)
    assert compare.main([*common, "--resume", str(path)]) == 0
    assert seen[0] == seen[1] == tmp_path / "out" / "tmp" / path.stem
    assert [r["seed"] for r in json.loads(path.read_text())["runs"]["jaxres"]] == [0]


def test_results_files_combine_into_one_comparison_of_every_seed(tmp_path, monkeypatch):
    """Seeds run one per core (`--threads 1`) and a 2-thread comparison with the reference
    become one file: accuracies over all runs, times only where threads and CPU agree."""
    tta = {0: 0.905, 1: 0.909, 5: 0.907}
    monkeypatch.setattr(compare, "run_jaxres", lambda args, seed, out_dir: finished_run(seed, tta[seed], 40.0 + seed))
    fake = tmp_path / "fake_reference.py"
    fake.write_text(FAKE_REFERENCE)
    reference = ["--reference", f"{sys.executable} {fake} {{seed}} {{json}}", "--npz", str(tmp_path / "data.npz")]
    (tmp_path / "data.npz").write_bytes(b"")

    def measure(name, *argv):
        out = tmp_path / name
        assert compare.main([*argv, "--out", str(out)]) == 0
        (path,) = out.glob("airbench94-cpu-*.json")
        return path

    core0 = measure("core0", "--seeds", "0", "--threads", "1")
    core1 = measure("core1", "--seeds", "1", "--threads", "1")
    earlier = measure("earlier", "--seeds", "5", "--reference-seeds", "0", "1", "--threads", "2", *reference)
    assert compare.main(["--combine", str(core0), str(core1), str(earlier), "--out", str(tmp_path / "all")]) == 0
    (path,) = (tmp_path / "all").glob("airbench94-combined-*.json")
    combined = json.loads(path.read_text())
    assert [r["seed"] for r in combined["runs"]["jaxres"]] == [0, 1, 5]
    assert [(r["seed"], r["threads"]) for r in combined["runs"]["reference"]] == [(0, 2), (1, 2)]
    assert [r["source"] for r in combined["runs"]["jaxres"]] == [str(core0), str(core1), str(earlier)]
    comparison = combined["comparison"]
    np.testing.assert_allclose(comparison["jaxres"]["tta_accuracy_mean"], np.mean([0.905, 0.909, 0.907]))
    np.testing.assert_allclose(comparison["reference"]["tta_accuracy_mean"], 0.915)
    np.testing.assert_allclose(comparison["tta_accuracy_mean_difference_points"], 100 * (0.907 - 0.915))
    assert "timed_seconds_ratio_jaxres_over_reference" not in comparison and "3 results files" in comparison["times_not_compared"]
    assert path.with_suffix(".png").stat().st_size > 0  # the figure beside it

    # one file's runs (one session, same threads): the times are compared too; two files' are
    # not, even with the same threads and CPU (other sessions, other loads)
    single = compare.combine([earlier], tmp_path / "one")
    np.testing.assert_allclose(json.loads(single.read_text())["comparison"]["timed_seconds_ratio_jaxres_over_reference"], 45.0 / 100.5)
    tta[6] = 0.9
    later = measure("later", "--seeds", "6", "--reference-seeds", "2", "--threads", "2", *reference)
    two = json.loads(compare.combine([earlier, later], tmp_path / "two").read_text())["comparison"]
    assert "timed_seconds_ratio_jaxres_over_reference" not in two and "2 results files" in two["times_not_compared"]

    # one side of a file: the reference's runs of `earlier` beside jaxres seeds of other files
    picked = json.loads(compare.combine([core0, core1, f"{earlier}:reference"], tmp_path / "picked").read_text())
    assert [r["seed"] for r in picked["runs"]["jaxres"]] == [0, 1] and len(picked["runs"]["reference"]) == 2
    assert picked["combined_from"][2]["left_out"] == {"jaxres": [5]}
    np.testing.assert_allclose(picked["comparison"]["tta_accuracy_mean_difference_points"], 100 * (0.907 - 0.915))
    with pytest.raises(ValueError, match="no finished reference run"):
        compare.combine([f"{core0}:reference"], tmp_path / "none")

    with pytest.raises(ValueError, match=re.escape(f"jaxres seed 0 is in both {core0} and {core0}")):
        compare.combine([core0, core0], tmp_path / "twice")
    with pytest.raises(ValueError, match="is itself a combined file"):
        compare.combine([path, core0], tmp_path / "nested")
    with pytest.raises(SystemExit):  # a combined file is not resumed
        compare.main(["--resume", str(path)])
    flagged = json.loads(core1.read_text()) | {"jaxres_flags": ["--epochs", "2"]}
    (tmp_path / "flagged.json").write_text(json.dumps(flagged))
    with pytest.raises(ValueError, match="jaxres_flags"):
        compare.combine([core0, tmp_path / "flagged.json"], tmp_path / "mixed")
    # a flag named as ignored (one a later commit's preset does by default) is left out of the
    # comparison, and each run keeps its own flags; the other flags are still compared
    assert compare.main(["--combine", str(core0), str(tmp_path / "flagged.json"), "--ignore-flag=--epochs",
                         "--ignore-flag", "2", "--out", str(tmp_path / "ignored")]) == 0  # fmt: skip
    (ignored,) = (tmp_path / "ignored").glob("airbench94-combined-*.json")
    ignored = json.loads(ignored.read_text())
    assert ignored["jaxres_flags"] == [] and ignored["ignored_flags"] == ["--epochs", "2"]
    assert [r["jaxres_flags"] for r in ignored["runs"]["jaxres"]] == [[], ["--epochs", "2"]]
    with pytest.raises(ValueError, match="jaxres_flags"):
        compare.combine([core0, tmp_path / "flagged.json"], tmp_path / "half", ignored_flags=("--epochs",))
    with pytest.raises(SystemExit):
        compare.main(["--ignore-flag=--epochs", "--seeds", "0"])
    # a file that gives only its reference runs brings no jaxres flags to compare: jaxres runs
    # with other flags (e.g. --conv-algorithm=winograd) beside the reference of an older file
    (tmp_path / "flagged-earlier.json").write_text(json.dumps(json.loads(earlier.read_text()) | {"jaxres_flags": ["--epochs", "2"]}))
    beside = json.loads(compare.combine([core0, f"{tmp_path / 'flagged-earlier.json'}:reference"], tmp_path / "beside").read_text())
    assert beside["jaxres_flags"] == [] and len(beside["runs"]["reference"]) == 2
    (tmp_path / "unfinished.json").write_text(json.dumps(flagged | {"runs": {"jaxres": [], "reference": []}}))
    with pytest.raises(ValueError, match="no finished jaxres or reference run"):
        compare.combine([tmp_path / "unfinished.json"], tmp_path / "empty")


def test_two_comparisons_started_in_the_same_second_get_a_file_each(tmp_path):
    first = compare.new_results_path(tmp_path, "airbench94-cpu-20261205T153132Z")
    second = compare.new_results_path(tmp_path, "airbench94-cpu-20261205T153132Z")
    assert (first.name, second.name) == ("airbench94-cpu-20261205T153132Z.json", "airbench94-cpu-20261205T153132Z-2.json")


def test_a_resumed_comparison_keeps_its_threads_data_and_flags(tmp_path, monkeypatch):
    used = []
    monkeypatch.setattr(compare, "run_jaxres", lambda args, seed, out_dir: used.append((args.threads, args.data, args.jaxres_flag, args.malloc)) or finished_run(seed))
    out = ["--out", str(tmp_path)]
    assert compare.main(["--seeds", "0", "--threads", "1", "--data", "images", "--jaxres-flag=--epochs=2", "--malloc", "kept", *out]) == 0
    (path,) = tmp_path.glob("airbench94-cpu-*.json")
    assert compare.main(["--seeds", "0", "1", "--resume", str(path), *out]) == 0
    assert used == [(1, "images", ["--epochs=2"], "kept")] * 2
    with pytest.raises(SystemExit):
        compare.main(["--seeds", "0", "1", "2", "--resume", str(path), "--threads", "2", *out])
    assert json.loads(path.read_text())["comparison"]["not_compared"] == "no reference runs (yet)"


def test_a_resumed_comparison_runs_the_seeds_it_planned(tmp_path, monkeypatch):
    """`--resume FILE` alone goes on with FILE's seeds: an interrupted `--seeds 2` run is seed 2
    again, not the default seeds 0 1 2 (a file from before that record must name its seeds)."""
    ran = []

    def interrupted_after_seed_5(args, seed, out_dir):
        ran.append(seed)
        if ran == [5, 7]:  # the first try of seed 7
            raise KeyboardInterrupt
        return finished_run(seed)

    monkeypatch.setattr(compare, "run_jaxres", interrupted_after_seed_5)
    out = ["--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        compare.main(["--seeds", "5", "7", *out])
    (path,) = tmp_path.glob("airbench94-cpu-*.json")
    assert compare.main(["--resume", str(path), *out]) == 0
    assert ran == [5, 7, 7]
    results = json.loads(path.read_text())
    assert [r["seed"] for r in results["runs"]["jaxres"]] == [5, 7]
    assert (results["seeds"], results["reference"]) == ([5, 7], None)
    assert compare.main(["--resume", str(path), "--seeds", "5", "7", "8", *out]) == 0  # more seeds, when asked
    assert ran == [5, 7, 7, 8] and json.loads(path.read_text())["seeds"] == [5, 7, 8]
    del results["seeds"]  # as files written before the plan was recorded
    path.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="2"):
        compare.main(["--resume", str(path), *out])
    assert ran == [5, 7, 7, 8]


def test_the_figure_draws_each_sides_mean_accuracy_after_each_epoch():
    curves = {"jaxres": [[0.60, 0.80, 0.90], [0.64, 0.82, 0.91]], "reference": [[0.66, 0.81, 0.905]]}
    results = {"runs": {side: [{**finished_run(seed, curve[-1] + 0.01), "test_accuracy_per_epoch": curve}
                               for seed, curve in enumerate(runs)] for side, runs in curves.items()}}  # fmt: skip
    figure, means = compare.comparison_figure(results)
    np.testing.assert_allclose(means["jaxres"], [62.0, 81.0, 90.5])
    np.testing.assert_allclose(means["reference"], [66.0, 81.0, 90.5])
    curves_axes, final_axes = figure.axes
    assert len(curves_axes.lines) == 2 + 1 + 2  # a thin line per seed and a mean per side
    finals = [c.get_offsets()[:, 1] for c in final_axes.collections if isinstance(c, PathCollection)]  # the dots
    np.testing.assert_allclose(np.concatenate(finals), [91.0, 92.0, 91.5])


def test_a_terminated_comparison_stops_its_run(tmp_path):
    """`kill` of the comparison (SIGTERM) ends the run it waits for too, not only itself."""
    import os
    import signal
    import subprocess
    import time

    child_pid = tmp_path / "child.pid"
    run = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = tmp_path / "comparison.py"
    script.write_text(
        "import subprocess, sys\n"
        "from benchmarks import airbench\n"
        "airbench.stop_runs_on_sigterm()\n"
        f"subprocess.run([sys.executable, '-c', {run!r}])\n"
    )
    root = str(Path(__file__).parents[1])
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": root}, cwd=root)
    deadline = time.monotonic() + 60
    while not (child_pid.exists() and child_pid.read_text()) and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):  # the child is killed and reaped by subprocess.run before the parent exits
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the run outlived the comparison")


def test_malloc_is_set_alike_on_both_sides_unless_each_keeps_its_own(monkeypatch):
    """--malloc: the environment both sides' processes get (threads aside)."""
    from argparse import Namespace

    from jaxres import runtime

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXRES_MALLOC", raising=False)
    environments = {malloc: compare.common_environment(Namespace(threads=1, malloc=malloc)) for malloc in compare.MALLOCS}
    assert "GLIBC_TUNABLES" not in environments["each-own"] and "JAXRES_MALLOC" not in environments["each-own"]
    assert environments["kept"]["GLIBC_TUNABLES"] == runtime.GLIBC_TUNABLES_KEEPING_FREED_MEMORY
    assert environments["system"]["JAXRES_MALLOC"] == "system" and "GLIBC_TUNABLES" not in environments["system"]
    # jaxres, told "kept" through the tunables, leaves malloc to them; told "system", leaves it alone
    assert runtime.malloc_left_alone_because(environments["kept"]).startswith("the user's own malloc settings")
    assert runtime.malloc_left_alone_because(environments["system"]) == "JAXRES_MALLOC=system"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.x86_ibt=off")  # a user's own tunables stay
    kept = compare.common_environment(Namespace(threads=1, malloc="kept"))["GLIBC_TUNABLES"]
    assert kept == "glibc.cpu.x86_ibt=off:" + runtime.GLIBC_TUNABLES_KEEPING_FREED_MEMORY
