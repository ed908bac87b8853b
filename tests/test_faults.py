"""Faults of the run directory and the trainer: impossible flags and config values, named
before any work."""

import json

import pytest

from jaxres import train
from jaxres.config import TrainConfig
from jaxres.errors import JaxresError

MISSING_DATA = "/nonexistent/jaxres-data.tar.gz"  # a flag error must be reported before the data is looked at


def single_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


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
    assert train.main(["--data", MISSING_DATA, "--workdir", str(tmp_path / "run"), *flags]) == 2
    line = single_error_line(capsys)
    assert line.startswith(f"error: {field} must"), line
    assert not (tmp_path / "run").exists()


def test_config_json_with_wrongly_typed_values_is_named(tmp_path):
    for values, message in [({"width": "wide"}, "width must be a float"), ({"epochs": 2.5}, "epochs must be an int"),
                            ({"flip": 1}, "flip must be a bool")]:  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(values))
        with pytest.raises(JaxresError, match=message):
            TrainConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(JaxresError, match="not a JSON object"):
        TrainConfig.load(tmp_path / "config.json")
