"""The quickstart notebook: committed with its outputs, and it runs clean.

The committed copy keeps its outputs (the Keras progress bars, the tables, the
lift chart) so that a reader sees them on GitHub. To refresh them after
changing the notebook, run from the repository root:

    TF_USE_LEGACY_KERAS=1 .venv/bin/python tests/test_notebook.py
"""

import os
import re
import shutil
import sys

import pytest

NOTEBOOK = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    os.pardir,
    "examples",
    "quickstart.ipynb",
)
# The quickstart teaches the library's own flow, not the experiment code.
EXPERIMENT_NAMES = ("experiments", "baselines", "report", "demo", "tune", "recipes")
# ipykernel would forward TensorFlow's C++ start-up lines (written to file
# descriptor 2 before any log setting is read) into the first cell's output;
# with this they go to the kernel's own stderr.
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|work|root|Users|var|private)/")


def execute(path, cwd, timeout=900):
    """Runs the notebook at `path` in a fresh kernel in `cwd`; returns it, executed."""
    import nbclient  # noqa: PLC0415 - the notebook extras are optional
    import nbformat  # noqa: PLC0415

    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        extra_arguments=KERNEL_ARGUMENTS,
        resources={"metadata": {"path": str(cwd)}},
    ).execute()
    return notebook


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _outputs(notebook, output_type=None):
    return [
        output
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if output_type is None or output.get("output_type") == output_type
    ]


def _text(notebook):
    """Everything the notebook printed or displayed as text."""
    parts = []
    for output in _outputs(notebook):
        parts.append(output.get("text", ""))
        parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(notebook):
    return [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]


def _printed_number(text, label):
    match = re.search(re.escape(label) + r":\s*([+-]?\d+\.\d+)", text)
    assert match, f"the notebook did not print {label!r}"
    return float(match.group(1))


def _check_results(notebook):
    """The assertions that hold for any clean run of the notebook."""
    assert not _outputs(notebook, "error")
    assert len(_images(notebook)) == 1, "the lift chart is not displayed inline"
    text = _text(notebook)
    assert "serving_default matches Keras: True" in text
    assert _printed_number(text, "AUC lift over cold start at full support") > 0
    assert _printed_number(text, "AUC lift over no adaptation at full support") > 0
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text).group(0)
    assert "INFO:tensorflow" not in text and "absl::InitializeLog" not in text


def test_notebook_imports_no_experiment_code():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    imports = [
        line
        for cell in _code_cells(notebook)
        for line in cell.source.splitlines()
        if re.match(r"\s*(from|import)\s", line)
    ]
    assert any("tf_limaml" in line for line in imports)
    for line in imports:
        for name in EXPERIMENT_NAMES:
            assert not re.search(rf"\b{name}\b", line), line


def test_committed_notebook_shows_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    counts = [cell.execution_count for cell in _code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"execution counts {counts}: run `python tests/test_notebook.py` to "
        "execute the notebook top to bottom and save its outputs"
    )
    _check_results(notebook)


@pytest.mark.slow
def test_quickstart_notebook_runs_clean(tmp_path):
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    copy = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, copy)
    notebook = execute(copy, tmp_path)
    _check_results(notebook)
    assert str(tmp_path) not in _text(notebook)
    assert (tmp_path / "runs" / "quickstart" / "lift.png").exists()
    assert (
        tmp_path / "runs" / "quickstart" / "export" / "1" / "saved_model.pb"
    ).exists()


if __name__ == "__main__":
    import time

    import nbformat

    start = time.monotonic()
    executed = execute(NOTEBOOK, os.getcwd())
    _check_results(executed)
    nbformat.write(executed, NOTEBOOK)
    print(f"executed {NOTEBOOK} in {time.monotonic() - start:.0f} s", file=sys.stderr)
