"""Bad input and I/O faults at the command lines (gradcam, lr_find, evaluate): each ends in one
`error: ...` line and exit status 2, found before the work, never a traceback."""

from __future__ import annotations

import os

import pytest

from jaxres.errors import JaxresError, figure_output_path


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


def test_figure_output_path_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    # (the tests may run as root, for whom chmod does not make a folder read-only)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(JaxresError, match=r"cannot write into the folder .*"):
        figure_output_path(tmp_path / "sub" / "cams.png")
