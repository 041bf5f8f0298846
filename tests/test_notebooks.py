"""Every curated notebook runs top to bottom on the organism (outputs are committed stripped)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: Seconds each notebook may take on 2 CPU cores.
BUDGET_S = 300


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_organism(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    monkeypatch.setenv("CLIPSCOPE_MODEL", "organism")
    monkeypatch.setenv("CLIPSCOPE_OUT", str(tmp_path))  # notebooks write their files here
    start = time.perf_counter()
    NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert time.perf_counter() - start < BUDGET_S, f"{path.name} exceeded its {BUDGET_S} s budget"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
