"""The notebooks run top to bottom from a clean kernel, so that they cannot silently rot.

Each notebook checks its own claims (a fit within 2% of the truth, a loss cut tenfold,
derivatives against finite differences) with ``assert`` cells, so running it is the test.
The committed notebooks keep their outputs; after editing one, regenerate them with
``python tests/test_notebooks.py`` (executes every notebook in place).
"""

import pathlib
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def execute(path: pathlib.Path):
    """``path``'s notebook executed in a fresh kernel, with the notebook's folder as cwd."""
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        book,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return book


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    execute(path)  # a cell that raises (a failed assert among them) fails the test


def test_committed_notebooks_have_outputs():
    import json

    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] for c in cells), f"{path.name} is committed without its outputs"


if __name__ == "__main__":
    import nbformat

    for p in NOTEBOOKS if len(sys.argv) < 2 else [pathlib.Path(a).resolve() for a in sys.argv[1:]]:
        print(f"executing {p.name}", flush=True)
        nbformat.write(execute(p), p)
