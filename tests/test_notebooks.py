"""Every notebook runs top to bottom with small settings; each asserts its own headline result."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# Notebooks that run a whole analyzer on an embedded model take minutes each on a 2-core CPU:
# they run with `make test-slow`; the quickstart and the successor notebook run in `make test`.
FAST = {"00_quickstart.ipynb", "10_successor.ipynb"}
CASES = [pytest.param(p, id=p.name, marks=() if p.name in FAST else pytest.mark.slow) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PROBE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "strip outputs"
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


def test_there_is_a_quickstart():
    assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)
