"""The config as the single description of a run: --help and the README table from the same
field metadata, presets, run options vs recipe on --resume, and one-way imports."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import shlex
from pathlib import Path

import pytest

from jaxres import cli, config as config_lib, train
from jaxres.config import RUN_OPTIONS, TrainConfig
from jaxres.errors import JaxresError
from tests.helpers import quiet, random_dataset, stop_after_first_epoch, tiny_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_options_table_is_the_generated_one():
    text = README.read_text()
    table = cli.options_table()
    assert table in text, "README's options table is stale: regenerate it with `python -m jaxres.cli`"


def test_help_shows_every_fields_help_and_default():
    help_text = " ".join(cli.train_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"], field.name
        words = " ".join(field.metadata["help"].replace("`", "").split())
        assert words in help_text, field.name
        assert cli.flag_name(field.name) in help_text


def test_every_flag_sets_its_field():
    args = cli.train_parser().parse_args(["--width", "0.5", "--no-flip", "--train-subset", "none", "--peak-lr", "0.1"])
    config, auto_lr = cli.config_from_args(args)
    assert (config.width, config.flip, config.train_subset, config.peak_lr, auto_lr) == (0.5, False, None, 0.1, False)
    assert dataclasses.replace(config, width=1.0, flip=True, peak_lr=0.4) == TrainConfig()


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_each_presets_documented_command_gives_the_preset(name):
    function = config_lib.PRESETS[name]
    command = next(line.strip() for line in inspect.getdoc(function).splitlines() if "python -m jaxres.train" in line)
    argv = shlex.split(command)[3:]
    assert argv[:2] == ["--preset", name]
    config, _ = cli.config_from_args(cli.train_parser().parse_args(argv))
    given = cli.given_fields(cli.train_parser().parse_args(argv))
    assert config == config_lib.preset(name, **given)


def test_quick_preset_is_the_quick_start_and_flags_override_it():
    quick = config_lib.preset("quick")
    assert (quick.width, quick.epochs, quick.batch_size, quick.train_subset) == (0.25, 4, 256, 10_000)
    args = cli.train_parser().parse_args(["--preset", "quick", "--epochs", "2"])
    assert cli.config_from_args(args)[0] == dataclasses.replace(quick, epochs=2)
    with pytest.raises(JaxresError, match="unknown preset 'fast'; choose one of quick, recipe, shapes_demo"):
        config_lib.preset("fast")


def test_run_options_are_where_and_how_not_what():
    assert RUN_OPTIONS == {
        "data", "cache_dir", "workdir", "epoch_loop", "conv_backend", "conv_algorithm", "eval_batch_size", "misclassified_to_plot"
    }
    config = TrainConfig()
    assert config.recipe_differences(dataclasses.replace(config, data="elsewhere", epoch_loop="scan")) == []
    assert config.recipe_differences(dataclasses.replace(config, seed=1, width=0.5)) == ["width", "seed"]


@pytest.mark.slow
def test_resume_accepts_new_run_options_and_refuses_a_changed_recipe(tmp_path):
    dataset = random_dataset(num_train=64)
    config = tiny_config(tmp_path / "run", epochs=2)
    train.train_and_evaluate(config, dataset=dataset, log=quiet, on_epoch=stop_after_first_epoch, write_plots=False)
    with pytest.raises(JaxresError, match=r"differs in peak_lr, seed; resume with the same recipe"):
        train.train_and_evaluate(dataclasses.replace(config, peak_lr=0.1, seed=3), resume=True, dataset=dataset, log=quiet)
    moved = dataclasses.replace(config, data=str(tmp_path / "moved"), cache_dir=str(tmp_path / "cache"), eval_batch_size=8)
    result = train.train_and_evaluate(moved, resume=True, dataset=dataset, log=quiet, write_plots=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert TrainConfig.load(tmp_path / "run" / "config.json") == moved  # the new run options are recorded


def test_resume_flags_fill_in_from_the_saved_config(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = tiny_config(workdir, width=0.125, peak_lr=0.05)
    (workdir / "config.json").write_text(saved.to_json())
    args = cli.train_parser().parse_args(["--resume", "--workdir", str(workdir), "--cache-dir", "/tmp/elsewhere"])
    config, auto_lr = cli.config_from_args(args)
    assert config == dataclasses.replace(saved, cache_dir="/tmp/elsewhere") and not auto_lr


def _jaxres_imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(jaxres modules imported at the top level, (line, module) of those imported inside a
    function or class), from the source of `path`."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []

    def names(node):
        if isinstance(node, ast.ImportFrom) and node.module == "jaxres":
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxres."):
            return [node.module.split(".")[1]]
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] for a in node.names if a.name.startswith("jaxres.")]
        return []

    for statement in tree.body:
        if isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test):
            continue  # `python -m jaxres.x` hands over to jaxres.cli: not an import of the library
        for node in ast.walk(statement):
            for name in names(node):
                (top.add(name) if node in tree.body else nested.append((node.lineno, name)))
    return top, nested


def test_imports_go_one_way_and_none_hide_in_functions():
    package = REPO / "jaxres"
    modules = {path.stem: path for path in package.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        top, nested = _jaxres_imports(path)
        assert not nested, f"jaxres/{name}.py imports jaxres modules inside functions: {nested}"
        graph[name] = top & set(modules)

    def visit(name, chain):
        assert name not in chain, f"import cycle: {' -> '.join([*chain, name])}"
        for imported in graph[name]:
            visit(imported, [*chain, name])

    for name in graph:
        visit(name, [])


def test_an_interrupt_reports_the_checkpoint_of_the_presets_workdir(tmp_path, monkeypatch, capsys):
    """Ctrl-C after a first epoch: the message looks in the run's own workdir (here the
    quick preset's runs/quick), not in the default one."""
    monkeypatch.chdir(tmp_path)

    def interrupted_after_an_epoch(config, **_):
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        (Path(config.workdir) / "checkpoint.msgpack").write_bytes(b"saved")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_and_evaluate", interrupted_after_an_epoch)
    assert cli.train_main(["--preset", "quick", "--data", "shapes"]) == 130
    assert "the last checkpoint is intact (continue with --resume)" in capsys.readouterr().err
