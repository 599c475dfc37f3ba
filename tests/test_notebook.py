"""examples/byron_lab.ipynb runs top to bottom in a fresh kernel, with a budget of seconds."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "byron_lab.ipynb"


@pytest.mark.slow  # a fresh kernel, and a model trained for seconds on a real corpus
def test_byron_lab_notebook_executes(tmp_path, monkeypatch):
    """Every cell runs without an error (the kernel inherits CHARLSTM_DATA, so no download), and the
    run it trains ends with a best and a last checkpoint."""
    run = tmp_path / "byron_lab"
    monkeypatch.setenv("BYRON_LAB_SECONDS", "3")
    monkeypatch.setenv("BYRON_LAB_RUN", str(run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is the "python3" kernelspec of this environment; jupyter_client starts it with
    # this interpreter, so it imports the charlstm under test.
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    assert (run / "best" / "checkpoint.safetensors").is_file()
    assert (run / "last" / "checkpoint.safetensors").is_file()
    outputs = "".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "longest copy" in outputs and "T = 0.5" in outputs
