"""colab/*.ipynb: each runs top to bottom here, small, and stays readable.

Every notebook in colab/ is executed with nbclient in a kernel of this
Python (the project's virtual environment), from colab/ as a Jupyter or
Colab user would, with its "parameters" cell replaced by `SMALL = True`;
any cell error fails the test. The saved notebooks keep the outputs of a
run here (so that GitHub shows the plots): they must stay under 1 MB, and
each must open with an "Open in Colab" badge.

To run them again and save their outputs in place (with the parameters
cell as written, which chooses the small run on a CPU):

    .venv/bin/python -m tests.test_notebooks [quickstart.ipynb ...]
"""

import os
import pathlib
import sys
import tempfile
import time

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
MAX_BYTES = 1_000_000
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Seconds one cell may take: a training cell runs three small models,
# about a minute on a quiet 2-core CPU; leave room for a loaded one.
CELL_TIMEOUT = 900


def parameters_cell(nb):
    """The one cell tagged "parameters" (papermill's convention)."""
    cells = [cell for cell in nb.cells
             if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, (
        f"expected one cell tagged 'parameters', found {len(cells)}")
    return cells[0]


class ThisPythonKernel(KernelManager):
    """Starts `python -m ipykernel_launcher` of this interpreter (the
    project's environment), not whichever `python3` kernel spec Jupyter
    finds first."""

    def format_kernel_cmd(self, extra_arguments=None):
        return [sys.executable, "-m", "ipykernel_launcher", "-f",
                os.path.realpath(self.connection_file),
                *(extra_arguments or [])]


def execute(path, tmp_dir, small=None):
    """Runs the notebook at `path` top to bottom; returns it with outputs.

    `tmp_dir`: the kernel's `TMPDIR`, where the notebooks' workdirs and
    TensorBoard logs go. `small`: None runs the parameters cell as
    written; True or False replaces it with `SMALL = <small>`. The returned
    notebook has the original parameters cell. Raises
    `nbclient.exceptions.CellExecutionError` at the first cell that fails.
    """
    nb = nbformat.read(path, as_version=4)
    cell = parameters_cell(nb)
    written = cell.source
    if small is not None:
        cell.source = f"SMALL = {small!r}  # set by tests/test_notebooks.py"
    NotebookClient(
        nb, kernel_name="python3", kernel_manager_class=ThisPythonKernel,
        timeout=CELL_TIMEOUT, record_timing=False,
        resources={"metadata": {"path": str(path.parent)}}).execute(
            env={**os.environ, "TMPDIR": str(tmp_dir)})
    cell.source = written
    return nb


def images(nb):
    return sum("image/png" in output.get("data", {})
               for cell in nb.cells if cell.cell_type == "code"
               for output in cell.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_small_with_badge_and_outputs(path):
    assert path.stat().st_size < MAX_BYTES, (
        f"{path.name} is {path.stat().st_size:,} bytes: save smaller "
        f"outputs (fewer log lines, lower-dpi plots)")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and BADGE in first.source, (
        f"{path.name}: the first cell must hold the Open in Colab badge")
    assert f"/colab/{path.name})" in first.source, (
        f"{path.name}: the badge must open this notebook")
    assert parameters_cell(nb).source.startswith("SMALL = None")
    assert images(nb) >= 2, (
        f"{path.name} was saved without the plots of a run: "
        f"python -m tests.test_notebooks {path.name}")


def test_colab_holds_the_five_notebooks_each_in_the_readme_table():
    assert {path.name for path in NOTEBOOKS} == {
        "quickstart.ipynb", "train_on_tpu.ipynb", "lazy_neuron.ipynb",
        "sparse_inference.ipynb", "choosing_k.ipynb"}
    readme = (COLAB.parent / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"| [{path.name}](colab/{path.name}) | [![Open In Colab]" \
            f"({BADGE})](https://colab.research.google.com/github/" in readme, (
                f"README.md's notebook table lacks a badge row for {path.name}")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = execute(path, tmp_path, small=True)
    assert images(nb) >= 2, f"{path.name} drew fewer than 2 plots"


if __name__ == "__main__":
    chosen = sys.argv[1:]
    for notebook in NOTEBOOKS:
        if chosen and notebook.name not in chosen:
            continue
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp_dir:
            executed = execute(notebook, tmp_dir)
        nbformat.write(executed, notebook)
        print(f"{notebook.name}: {time.time() - start:.0f} s, "
              f"{notebook.stat().st_size:,} bytes, {images(executed)} plots")
