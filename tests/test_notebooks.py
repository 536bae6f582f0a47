"""Every notebook runs top to bottom (in its small mode, JDROP_NOTEBOOK_SMALL=1) with jdrop's deprecations as
errors, and shows at least one plot."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# Run first in every kernel: a deprecated jdrop spelling in a notebook fails the test instead of printing a warning
# that the committed outputs would hide.
DEPRECATIONS_AS_ERRORS = (
    "import warnings\n"
    "from jdrop._validation import JdropDeprecationWarning\n"
    "warnings.filterwarnings('error', category=JdropDeprecationWarning)"
)


def _execute(notebook, directory):
    notebook.cells.insert(0, nbformat.v4.new_code_cell(DEPRECATIONS_AS_ERRORS))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(directory)}})
    client.execute()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.integration  # every notebook, executed: minutes
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("JDROP_NOTEBOOK_SMALL", "1")
    root = str(path.parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0].source
    assert "colab-badge.svg" in first, "the first cell opens with an 'Open in Colab' badge"
    assert 'if "google.colab" in sys.modules' in notebook.cells[1].source, "installs jdrop only in Colab"
    _execute(notebook, path.parent)
    images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert images, "the notebook shows its results as plots"


@pytest.mark.integration
def test_a_deprecated_spelling_fails_a_notebook(tmp_path, monkeypatch):
    """The guard works: a cell that calls jdrop.mlp.apply(..., train=True) stops the notebook with the warning."""
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import jax, jdrop\n"
        "params = jdrop.mlp.init(jax.random.key(0), [2, 3])\n"
        "jdrop.mlp.apply(params, jax.numpy.ones(2), key=jax.random.key(1), rates=0.5, train=True)"
    )])
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="JdropDeprecationWarning"):
        _execute(notebook, tmp_path)
