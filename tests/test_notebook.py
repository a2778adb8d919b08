"""The quickstart notebook runs clean from top to bottom."""

import os

import pytest

NOTEBOOK = os.path.join(
    os.path.dirname(__file__), os.pardir, "examples", "quickstart.ipynb"
)


@pytest.mark.slow
def test_quickstart_notebook_runs_clean(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    # The chart was written, and the before/after table has both score columns.
    assert (tmp_path / "runs" / "quickstart" / "lift.png").exists()
    text = "".join(
        str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    assert "score before" in text and "score after" in text
