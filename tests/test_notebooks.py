"""Execute the notebooks in ``notebooks/`` end to end on the zoo models (CPU, offline) and fail on any error.

They run in a ``python3`` kernel; jupyter_client launches a kernelspec whose command is ``python`` with
``sys.executable``, so the kernel uses this interpreter (ipykernel from the ``test`` extra provides the spec).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("name", [pytest.param("quickstart.ipynb", marks=pytest.mark.slow),
                                  pytest.param("tradeoffs.ipynb", marks=pytest.mark.slow)])
def test_notebook_runs(name: str, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        f"{name} has stored outputs: strip them before committing")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors, errors
