"""Bad input and I/O faults at the command lines (gradcam, lr_find, evaluate): each ends in one
`error: ...` line and exit status 2, found before the work, never a traceback.

One run directory serves every test here: the files the trainer writes (config.json,
dataset.json, checkpoint.msgpack) for a width-0.0625 model of the CIFAR-10 classes whose
weights are all zero, written without training (its logits are all equal, so it predicts
class 0 for every image).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxres import backends, cli, evaluate, loops, models, optim, rundir, train
from jaxres import gradcam as cam_lib
from jaxres.config import TrainConfig
from jaxres.data import CIFAR10_CLASSES
from jaxres.errors import JaxresError, figure_output_path


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A run directory of an all-zero model of the 10 CIFAR-10 classes on 32x32 images."""
    workdir = tmp_path_factory.mktemp("cifar-run")
    config = TrainConfig(data="cifar10", width=0.0625, eval_batch_size=16, workdir=str(workdir))
    model = backends.model_from_config(config, len(CIFAR10_CLASSES))
    optimizer = optim.make_optimizer(config, steps_per_epoch=1)[0]
    template = jax.eval_shape(lambda: train.init_train_state(config, optimizer, models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))))
    state = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), template)
    rundir.atomic_write_bytes(workdir / rundir.CONFIG_NAME, config.to_json().encode())
    info = {"class_names": list(CIFAR10_CLASSES), "image_shape": [32, 32, 3], "source": "tensorflow-datasets cifar10"}
    (workdir / rundir.DATA_INFO_NAME).write_text(json.dumps(info))
    rundir.save_checkpoint(workdir, state)
    return workdir


def image_tree(root, size: int = 32, test_per_class: int = 3):
    """ROOT/{train,test}/<CIFAR-10 class>/*.png of noise: one train image per class, and
    `test_per_class` test images per class. Returns root."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 1), ("test", test_per_class)):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar_like_tree(tmp_path_factory):
    return image_tree(tmp_path_factory.mktemp("tree"))


def run_command(main, argv, capsys):
    """(exit status, stdout, stderr) of an in-process `main(argv)`."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def no_computing(monkeypatch):
    """Fail the test if a command starts computing (evaluating or predicting)."""

    def computing(*args, **kwargs):
        raise AssertionError("the command computed before it checked its input")

    monkeypatch.setattr(evaluate, "make_evaluate", computing)
    monkeypatch.setattr(cam_lib, "_predict", computing)


# --------------------------------------------------------------------------- the data must be the run's kind


@pytest.mark.parametrize("main", [cli.evaluate_main, cli.gradcam_main], ids=["evaluate", "gradcam"])
def test_data_with_other_classes_is_named_before_computing(main, cifar_run, no_computing, capsys, tmp_path):
    """Issue 11 item 13: a CIFAR-10 run with --data shapes (evaluate used to print 16.95%, gradcam
    raised IndexError)."""
    argv = ["--workdir", cifar_run, "--data", "shapes"] + ([] if main is cli.evaluate_main else ["--out", tmp_path / "c.png"])
    status, _, err = run_command(main, argv, capsys)
    assert status == 2
    assert_one_error_line(err, "class names differ", "'airplane'", "'truck'", "'circle'", "'ring'", str(cifar_run))
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("main", [cli.evaluate_main, cli.gradcam_main], ids=["evaluate", "gradcam"])
def test_data_with_other_image_shape_is_named_before_computing(main, cifar_run, no_computing, capsys, tmp_path):
    tree = image_tree(tmp_path / "small", size=8, test_per_class=1)
    argv = ["--workdir", cifar_run, "--data", tree, "--cache-dir", tmp_path / "cache"]
    status, _, err = run_command(main, argv + ([] if main is cli.evaluate_main else ["--out", tmp_path / "c.png"]), capsys)
    assert status == 2
    assert_one_error_line(err, "image shape differs", "32x32x3", "8x8x3")


def test_check_data_fits_run_accepts_the_runs_kind(cifar_run, cifar_like_tree, tmp_path):
    from jaxres.data import load_dataset

    dataset = load_dataset(cifar_like_tree, cache_dir=tmp_path / "cache", progress=False)
    rundir.check_data_fits_run(cifar_run, dataset)  # no error
    renamed = dataclasses.replace(dataset, class_names=tuple(reversed(dataset.class_names)))
    with pytest.raises(JaxresError, match="class names differ"):  # same names, other order: other labels
        rundir.check_data_fits_run(cifar_run, renamed)


def test_evaluate_on_data_of_the_runs_kind(cifar_run, cifar_like_tree, capsys, tmp_path):
    argv = ["--workdir", cifar_run, "--data", cifar_like_tree, "--cache-dir", tmp_path / "cache", "--tta", "none"]
    status, out, err = run_command(cli.evaluate_main, argv, capsys)
    assert status == 0, err
    # the all-zero model predicts class 0: right on the 3 airplanes of 30 test images
    assert "10.00%" in out.splitlines()[1]


def test_evaluate_decides_its_loop_once_for_every_tta_mode(cifar_run, cifar_like_tree, monkeypatch, tmp_path):
    """`auto` traces the model to look for XLA convolutions: evaluate_run does that once and
    hands the one decision to each mode's make_evaluate (it used to trace once per mode)."""
    decisions, handed = [], []
    real_choose, real_make = loops.choose_loop, evaluate.make_evaluate

    def choose(*args, **kwargs):
        decisions.append(real_choose(*args, **kwargs))
        return decisions[-1]

    def make(*args, **kwargs):
        handed.append(kwargs.get("loop"))
        return real_make(*args, **kwargs)

    monkeypatch.setattr(loops, "choose_loop", choose)
    monkeypatch.setattr(evaluate, "make_evaluate", make)
    results = evaluate.evaluate_run(cifar_run, str(cifar_like_tree), ("none", "flip"), cache_dir=str(tmp_path / "cache"))
    assert len(decisions) == 1 and decisions[0] in ("scan", "steps")
    assert handed == [decisions[0], decisions[0]]
    assert results["none"]["accuracy"] == pytest.approx(0.1) and results["flip"]["accuracy"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- --misclassified spreads over classes


def test_misclassified_images_are_taken_round_robin_over_the_classes(cifar_run, cifar_like_tree, monkeypatch, capsys, tmp_path):
    """Issue 13 §3: an image-folder test split is sorted by class; the first misclassified
    images were all of one class. The all-zero model misclassifies every image but the
    airplanes (class 0), i.e. classes 1..9, three images each, in that order."""
    shown = {}
    plot_cams = cam_lib.plot_cams

    def recording_plot_cams(images, cams, true_labels=None, **kwargs):
        shown["true_labels"] = np.asarray(true_labels)
        return plot_cams(images, cams, true_labels, **kwargs)

    monkeypatch.setattr(cam_lib, "plot_cams", recording_plot_cams)
    out = tmp_path / "cams.png"
    argv = ["--workdir", cifar_run, "--data", cifar_like_tree, "--cache-dir", tmp_path / "cache", "--misclassified", "4", "--out", out]
    status, stdout, err = run_command(cli.gradcam_main, argv, capsys)
    assert status == 0, err
    assert stdout == f"wrote {out}\n" and out.read_bytes()[:4] == b"\x89PNG"
    assert shown["true_labels"].tolist() == [1, 2, 3, 4]  # round-robin: one of each class, classes in order


def test_round_robin_over_classes():
    labels = np.array([5, 5, 5, 2, 2, 7, 5, 2, 9])
    indices = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
    chosen = cam_lib.round_robin_over_classes(indices, labels, 6)
    assert chosen.tolist() == [0, 3, 5, 8, 1, 4]
    assert cam_lib.round_robin_over_classes(indices, labels, 100).tolist() == [0, 3, 5, 8, 1, 4, 2, 7, 6]
    assert cam_lib.round_robin_over_classes(indices[:0], labels[:0], 3).tolist() == []


# --------------------------------------------------------------------------- outputs are checked first


def test_figure_output_path(tmp_path):
    assert figure_output_path(tmp_path / "new" / "deeper" / "cams.PNG") == tmp_path / "new" / "deeper" / "cams.PNG"
    assert figure_output_path(tmp_path / "plot.pdf") == tmp_path / "plot.pdf"
    with pytest.raises(JaxresError, match=r"--out .*x\.txt has the suffix \.txt.*\.png"):
        figure_output_path(tmp_path / "x.txt")
    with pytest.raises(JaxresError, match=r"--plot .*cams has no suffix"):
        figure_output_path(tmp_path / "cams", flag="--plot")
    with pytest.raises(JaxresError, match=r"--out .* is a folder"):
        figure_output_path(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(JaxresError, match=r"--out .*file/cams\.png: .*file is a file, not a folder"):
        figure_output_path(tmp_path / "file" / "cams.png")


def test_figure_output_path_pgf_needs_its_tex(tmp_path, monkeypatch):
    """savefig raised RuntimeError for .pgf after all the work when the TeX system is missing."""
    import shutil

    import matplotlib

    monkeypatch.setattr(shutil, "which", lambda name: None)
    texsystem = matplotlib.rcParams["pgf.texsystem"]
    with pytest.raises(JaxresError, match=rf"--out .*cams\.pgf: the \.pgf format needs {texsystem}, which is not installed"):
        figure_output_path(tmp_path / "cams.pgf")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert figure_output_path(tmp_path / "cams.pgf") == tmp_path / "cams.pgf"


def test_figure_output_path_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    # (the tests may run as root, for whom chmod does not make a folder read-only)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(JaxresError, match=r"cannot write into the folder .*"):
        figure_output_path(tmp_path / "sub" / "cams.png")


# --------------------------------------------------------------------------- I/O faults: error line, exit 2


def test_evaluate_reports_an_unreadable_checkpoint(cifar_run, monkeypatch, capsys):
    culprit = str(rundir.checkpoint_path(cifar_run))

    def unreadable(workdir):
        raise PermissionError(errno.EACCES, "Permission denied", culprit)

    monkeypatch.setattr(evaluate, "load_for_inference", unreadable)
    status, _, err = run_command(cli.evaluate_main, ["--workdir", cifar_run], capsys)
    assert status == 2
    assert_one_error_line(err, f"error: {culprit}: Permission denied")


def test_evaluate_names_a_missing_workdir(tmp_path, capsys):
    status, _, err = run_command(cli.evaluate_main, ["--workdir", tmp_path / "nowhere"], capsys)
    assert status == 2
    assert_one_error_line(err, "nowhere")
