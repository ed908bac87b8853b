"""Faults of the run directory and the trainer: a kill at every write, damaged or foreign files,
impossible flags, unwritable folders, runs that diverge. A run directory must survive a kill at
any instant (resume gives the uninterrupted run's checkpoint and metrics rows) and never let a
damaged file pass for a good one.

All runs here are the same tiny one (width 1/16, 64 random images, 2 steps per epoch, 2 epochs);
a persistent compilation cache makes every run after the first cheap.
"""

import errno
import json
import math
import os
import shutil
import stat
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from jaxres import cli, evaluate, monitoring, rundir, train
from jaxres.config import TrainConfig
from jaxres.data import Dataset
from jaxres.errors import JaxresError
from tests.helpers import quiet, random_dataset, stop_after_first_epoch, tiny_config

TIMINGS = ("seconds", "images_per_second", "compile_seconds")  # differ between identical runs
MISSING_DATA = "/nonexistent/jaxres-data.tar.gz"  # a flag error must be reported before the data is looked at


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every train_and_evaluate call compiles its epoch anew (fresh closures); a persistent
    compilation cache turns the second and later compilations into cache reads."""
    from jax._src import compilation_cache as cache

    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla-cache")),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in options}
    cache.reset_cache()
    for name, value in options.items():
        jax.config.update(name, value)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.fixture(scope="module")
def dataset():
    return random_dataset()


def config_for(workdir, **overrides) -> TrainConfig:
    return tiny_config(workdir, train_subset=64, **overrides)


def run(config, dataset, **options):
    return train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, write_plots=False, **options)


def without_timings(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMINGS}


def run_record(workdir) -> tuple[bytes, list[dict]]:
    """(the checkpoint's state as bytes, metrics.jsonl's rows less timings), after checking that
    metrics.jsonl holds exactly the checkpoint's rows."""
    state, history = rundir.read_checkpoint(workdir)
    rows = rundir.read_metrics(workdir)
    assert rows == history
    return flax.serialization.msgpack_serialize(state), [without_timings(row) for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """The uninterrupted run: its workdir and record."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run(config_for(workdir), dataset)
    return workdir, run_record(workdir)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, dataset):
    """The same run stopped after epoch 1 of 2."""
    workdir = tmp_path_factory.mktemp("half") / "run"
    run(config_for(workdir), dataset, on_epoch=stop_after_first_epoch)
    return workdir


def copy_run(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def temporaries(workdir: Path) -> list[str]:
    return sorted(path.name for path in workdir.glob("*.tmp"))


def single_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ a kill at every write (items 1, 2)


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (it is no Exception, so no handler catches it)."""


# A 2-epoch run renames 7 files into place, in this order; a kill before each rename, and after
# the last, covers every state the directory can be left in.
WRITES = ["config", "dataset", "metrics", "checkpoint-1", "metrics-1", "checkpoint-2", "metrics-2"]
KILL_POINTS = [(index, "before") for index in range(len(WRITES))] + [(len(WRITES) - 1, "after")]


def kill_at_rename(monkeypatch, index: int, when: str) -> None:
    """Make the `index`-th `os.replace` (0-based) kill the run just before or just after it; a
    kill before the rename also leaves the temporary file behind, as a real one would."""
    real_replace = os.replace
    calls = []

    def replace(source, destination):
        calls.append(destination)
        if len(calls) - 1 == index and when == "before":
            os.link(source, str(destination) + ".killed00.tmp")  # survives atomic_write_bytes's cleanup
            raise Killed(destination)
        real_replace(source, destination)
        if len(calls) - 1 == index and when == "after":
            raise Killed(destination)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("index, when", KILL_POINTS, ids=[f"{when}-{WRITES[i]}" for i, when in KILL_POINTS])
def test_a_kill_at_any_write_then_resume_gives_the_uninterrupted_run(reference, dataset, tmp_path, monkeypatch, index, when):
    workdir = tmp_path / "run"
    config = config_for(workdir)
    with monkeypatch.context() as patch:
        kill_at_rename(patch, index, when)
        with pytest.raises(Killed):
            run(config, dataset)
    run(config, dataset, resume=rundir.checkpoint_path(workdir).is_file())  # as a user would: resume if there is a checkpoint
    assert run_record(workdir) == reference[1]
    assert temporaries(workdir) == []


def test_stale_temporaries_of_the_run_files_are_removed_on_resume_and_others_kept(reference, dataset, tmp_path):
    workdir = copy_run(reference[0], tmp_path)
    for name in ["checkpoint.msgpack.a1b2c3d4.tmp", "metrics.jsonl.zz_9y8x7.tmp", "notes.a1b2c3d4.tmp"]:
        (workdir / name).write_bytes(b"half written")
    run(config_for(workdir), dataset, resume=True)
    assert temporaries(workdir) == ["notes.a1b2c3d4.tmp"]


# ------------------------------------------------------------------ damaged files (items 3, 4, 5, 16)


def test_a_checkpoint_garbled_in_the_middle_is_refused_on_every_load(reference, dataset, tmp_path, capsys):
    workdir = copy_run(reference[0], tmp_path)
    data = bytearray((workdir / "checkpoint.msgpack").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1000] = bytes(255 - b for b in data[middle : middle + 1000])
    (workdir / "checkpoint.msgpack").write_bytes(bytes(data))
    damaged = r"checkpoint .*checkpoint.msgpack is damaged: digest mismatch"
    with pytest.raises(JaxresError, match=damaged):
        evaluate.load_for_inference(workdir)
    with pytest.raises(JaxresError, match=damaged):
        rundir.restore_checkpoint(workdir, None)
    with pytest.raises(JaxresError, match=damaged):
        run(config_for(workdir), dataset, resume=True)
    assert cli.train_main(["--resume", "--workdir", str(workdir)]) == 2  # found before the data is loaded
    assert "digest mismatch" in single_error_line(capsys)


def test_a_checkpoint_that_does_not_fit_the_edited_config_names_the_leaf(reference, tmp_path):
    workdir = copy_run(reference[0], tmp_path)
    edited = json.loads((workdir / "config.json").read_text()) | {"width": 0.125}
    (workdir / "config.json").write_text(json.dumps(edited))
    with pytest.raises(JaxresError, match=r"leaf params/\S+ is float32\[.*\] in the checkpoint, the model expects float32\["):
        evaluate.load_for_inference(workdir)


def test_a_torn_metrics_line_is_named_and_resume_restores_the_checkpoint_rows(reference, half_run, dataset, tmp_path):
    workdir = copy_run(half_run, tmp_path)
    text = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text(text[: len(text) // 2])
    with pytest.raises(JaxresError, match=r"metrics.jsonl line 1 is not valid JSON"):
        rundir.read_metrics(workdir)
    run(config_for(workdir), dataset, resume=True)
    assert run_record(workdir) == reference[1]


def test_a_dataset_json_that_is_not_json_is_named(reference, tmp_path):
    workdir = copy_run(reference[0], tmp_path)
    (workdir / "dataset.json").write_text('{"class_names": ["a", ')
    with pytest.raises(JaxresError, match=r"dataset.json is not valid JSON"):
        evaluate.load_for_inference(workdir)
    (workdir / "dataset.json").write_text('{"classes": 4}')
    with pytest.raises(JaxresError, match=r"dataset.json is not a jaxres dataset.json"):
        evaluate.load_for_inference(workdir)


def test_non_finite_metrics_are_written_as_null_and_read_back_as_nan(tmp_path):
    rows = [{"epoch": 1, "train_loss": math.nan, "test_loss": math.inf, "lr": 0.1}]
    text = rundir.metrics_text(rows)

    def reject(constant):
        raise ValueError(f"strict JSON has no {constant}")

    assert json.loads(text, parse_constant=reject) == {"epoch": 1, "train_loss": None, "test_loss": None, "lr": 0.1}
    (tmp_path / "metrics.jsonl").write_text(text)
    [row] = rundir.read_metrics(tmp_path)
    assert math.isnan(row["train_loss"]) and math.isnan(row["test_loss"]) and row["lr"] == 0.1


def test_every_run_file_is_written_0644(reference):
    for name in ["config.json", "dataset.json", "metrics.jsonl", "checkpoint.msgpack"]:
        assert stat.S_IMODE((reference[0] / name).stat().st_mode) == 0o644, name


def test_resuming_on_other_data_is_refused(half_run, dataset, tmp_path):
    workdir = copy_run(half_run, tmp_path)
    renamed = Dataset(dataset.train, dataset.test, ("w", "x", "y", "z"), dataset.source)
    with pytest.raises(JaxresError, match="class names differ: the run has"):
        run(config_for(workdir), renamed, resume=True)


# ------------------------------------------------------------------ the workdir (items 6, 10, 11)


def test_resume_with_nothing_to_resume_is_an_error_before_any_data(tmp_path, capsys):
    assert cli.train_main(["--resume", "--workdir", str(tmp_path / "nothing")]) == 2
    line = single_error_line(capsys)
    assert "nothing to resume" in line and "does not exist" in line
    (tmp_path / "typo").mkdir()
    assert cli.train_main(["--resume", "--workdir", str(tmp_path / "typo"), "--data", "shapes", "--epochs", "1"]) == 2
    assert "nothing to resume" in single_error_line(capsys)
    assert list((tmp_path / "typo").iterdir()) == []


def test_an_unwritable_workdir_is_named_before_any_data(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for workdir, message in [(a_file, "is a file, not a folder"), (a_file / "run", "cannot write to --workdir")]:
        assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(workdir)]) == 2
        assert message in single_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir_is_named_before_any_data(tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o555)
    assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(tmp_path / "locked")]) == 2
    assert "cannot write to --workdir" in single_error_line(capsys)


def test_an_io_error_anywhere_in_the_trainer_is_one_error_line(monkeypatch, tmp_path, capsys):
    def failing(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/config.json")

    monkeypatch.setattr(train, "train_and_evaluate", failing)
    assert cli.train_main(["--data", "shapes", "--workdir", str(tmp_path / "run")]) == 2
    assert single_error_line(capsys) == "error: /somewhere/config.json: Permission denied"


def test_a_full_disk_at_a_checkpoint_write_is_named_and_keeps_the_previous_checkpoint(half_run, dataset, tmp_path, monkeypatch):
    workdir = copy_run(half_run, tmp_path)
    before = (workdir / "checkpoint.msgpack").read_bytes()
    real_fsync = os.fsync

    def fsync(descriptor):
        if "checkpoint.msgpack" in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(JaxresError, match=r"cannot save epoch 2: .*checkpoint.msgpack: No space left on device"):
        run(config_for(workdir), dataset, resume=True)
    assert (workdir / "checkpoint.msgpack").read_bytes() == before
    assert temporaries(workdir) == []


@pytest.mark.parametrize("files", [["config.json", "metrics.jsonl", "dataset.json"], ["metrics.jsonl"]])
def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(tmp_path, capsys, files):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    contents = {name: f'{{"my own": "{name}"}}\n' for name in files}
    for name, text in contents.items():
        (workdir / name).write_text(text)
    assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(workdir)]) == 2
    assert "not a jaxres run" in single_error_line(capsys)
    assert {path.name: path.read_text() for path in workdir.iterdir()} == contents


def test_an_empty_folder_and_a_run_killed_before_its_first_checkpoint_are_usable(tmp_path):
    (tmp_path / "empty").mkdir()
    rundir.check_workdir(tmp_path / "empty", resume=False)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text(TrainConfig().to_json())
    rundir.check_workdir(tmp_path / "started", resume=False)


# ------------------------------------------------------------------ flags (item 7)


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--width", "inf"], "width"),
        (["--width", "nan"], "width"),
        (["--seed", "-1"], "seed"),
        (["--seed", "-1", "--train-subset", "64"], "seed"),
        (["--misclassified-to-plot", "-1"], "misclassified_to_plot"),
        (["--peak-lr", "nan"], "peak_lr"),
        (["--weight-decay", "nan"], "weight_decay"),
        (["--initial-loss-scale", "inf"], "initial_loss_scale"),
        (["--mix-alpha", "nan"], "mix_alpha"),
        (["--crop-padding", "-1"], "crop_padding"),
    ],
)
def test_impossible_flags_are_named_before_any_work(tmp_path, capsys, flags, field):
    assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(tmp_path / "run"), *flags]) == 2
    line = single_error_line(capsys)
    assert line.startswith(f"error: {field} must"), line
    assert not (tmp_path / "run").exists()


def test_config_json_with_wrongly_typed_values_is_named(tmp_path):
    for values, message in [({"width": "wide"}, "width must be a float"), ({"batch_size": 2.5}, "batch_size must be an int"),
                            ({"epochs": "24"}, "epochs must be a float"), ({"flip": 1}, "flip must be a bool")]:  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(values))
        with pytest.raises(JaxresError, match=message):
            TrainConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(JaxresError, match="not a JSON object"):
        TrainConfig.load(tmp_path / "config.json")


# ------------------------------------------------------------------ diverging runs (items 8, 9)


FINITE_TEST = {"loss": 1.0, "accuracy": 0.5}  # an evaluation that is fine


def nonfinite_epoch(**overrides) -> dict:
    return {"loss": math.nan, "accuracy": 0.1, "loss_scale": 1.0, "skipped_steps": 0, "first_nonfinite_step": 0} | overrides


@pytest.mark.parametrize(
    "precision, saved, expected, unexpected",
    [
        ("fp32", 0, r"non-finite at epoch 1, step 1; stopping\. No checkpoint was written.*Try a lower --peak-lr\.$", "fp32"),
        ("fp32", 3, r"epoch 4, step 1.*\(epoch 3\) in .* is intact\. Try a lower --peak-lr\.$", "--precision"),
        ("bf16", 0, r"No checkpoint was written.*Try a lower --peak-lr or --precision fp32\.$", "epoch 0"),
    ],
)
def test_the_divergence_message_is_true_for_every_run(tmp_path, precision, saved, expected, unexpected):
    config = config_for(tmp_path, precision=precision)
    with pytest.raises(monitoring.NonFiniteLossError, match=expected) as raised:
        monitoring.check_epoch_is_finite(config, tmp_path, saved + 1, nonfinite_epoch(), FINITE_TEST, steps_per_epoch=2)
    assert unexpected not in str(raised.value)


def test_an_fp16_epoch_with_every_step_skipped_stops_the_run(tmp_path):
    config = config_for(tmp_path, precision="fp16")
    some_skipped = nonfinite_epoch(skipped_steps=1)
    monitoring.check_epoch_is_finite(config, tmp_path, 2, some_skipped, FINITE_TEST, steps_per_epoch=2)  # fp16 skips a step and goes on
    with pytest.raises(monitoring.NonFiniteLossError, match=r"every one of the 2 steps of epoch 2 was skipped.*\(epoch 1\)"):
        monitoring.check_epoch_is_finite(config, tmp_path, 2, nonfinite_epoch(skipped_steps=2), FINITE_TEST, steps_per_epoch=2)


def test_a_non_finite_test_loss_stops_the_run_and_keeps_the_checkpoint(half_run, dataset, tmp_path, monkeypatch):
    workdir = copy_run(half_run, tmp_path)
    before = (workdir / "checkpoint.msgpack").read_bytes()
    real_make_evaluate = evaluate.make_evaluate

    def make_evaluate(*args, **kwargs):
        evaluate = real_make_evaluate(*args, **kwargs)
        return lambda *inputs: {**evaluate(*inputs), "loss": np.float32(np.nan)}

    monkeypatch.setattr(evaluate, "make_evaluate", make_evaluate)
    with pytest.raises(monitoring.NonFiniteLossError, match=r"test loss after epoch 2 is nan.*\(epoch 1\) in .* is intact"):
        run(config_for(workdir), dataset, resume=True)
    assert (workdir / "checkpoint.msgpack").read_bytes() == before


def test_an_epoch_with_every_step_skipped_stops_the_run_and_keeps_the_checkpoint(half_run, dataset, tmp_path, monkeypatch):
    """What `--precision fp16 --peak-lr 1e6` ends in (every gradient overflows at every loss
    scale), simulated on the fp32 run: the epoch reports every step skipped."""
    workdir = copy_run(half_run, tmp_path)
    before = (workdir / "checkpoint.msgpack").read_bytes()
    real_make_train_epoch = train.make_train_epoch

    def make_train_epoch(model, optimizer, config, mesh, steps_per_epoch, progress=None, steps=None, loop=None, still=None):
        train_epoch = real_make_train_epoch(model, optimizer, config, mesh, steps_per_epoch, progress, steps, loop, still)

        def all_skipped(*inputs):
            state, metrics = train_epoch(*inputs)
            return state, {**metrics, "skipped_steps": steps_per_epoch, "first_nonfinite_step": -1}

        return all_skipped

    monkeypatch.setattr(train, "make_train_epoch", make_train_epoch)
    with pytest.raises(monitoring.NonFiniteLossError, match=r"every one of the 2 steps of epoch 2 was skipped.*\(epoch 1\) in"):
        run(config_for(workdir), dataset, resume=True)
    assert (workdir / "checkpoint.msgpack").read_bytes() == before
