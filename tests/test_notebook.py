"""jaxres/examples/quickstart.ipynb runs top to bottom, headless, on tiny `shapes` settings."""

import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "jaxres" / "examples" / "quickstart.ipynb"
KERNEL_NAME = "jaxres-notebook-test"

# Read by the notebook's first cell: the synthetic data, a narrow model, one short epoch.
TINY_SETTINGS = {
    "JAXRES_NOTEBOOK_DATA": "shapes",
    "JAXRES_NOTEBOOK_WIDTH": "0.0625",
    "JAXRES_NOTEBOOK_EPOCHS": "1",
    "JAXRES_NOTEBOOK_BATCH_SIZE": "64",
    "JAXRES_NOTEBOOK_TRAIN_SUBSET": "512",
}


def install_test_kernel(prefix: Path) -> Path:
    """A kernelspec under prefix/share/jupyter whose argv is this very interpreter (sys.executable),
    so the notebook runs in the environment under test whatever other kernels are installed."""
    kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    return prefix / "share" / "jupyter"


@pytest.mark.slow
def test_quickstart_notebook_runs_without_errors(tmp_path, monkeypatch):
    jupyter_path = install_test_kernel(tmp_path / "kernel")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    for name, value in TINY_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JAXRES_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel runs in the notebook's folder: put this checkout first on its import path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell errors

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "test accuracy after 1 epoch(s)" in text
    assert "energy pointing game per image" in text  # shapes has masks, so the CAMs were scored
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3, "expected the curves, the misclassified grid and the Grad-CAM figure"
