"""Every notebook runs top to bottom and asserts its own headline result.

`make test` runs them with PROBE_NOTEBOOK_SMALL=1: the quickstart on a tiny random model and each method
notebook on its planted-mechanism model (`analyses.planted`), whose answer head is known; the whole set
takes a few minutes, mostly kernel start-up and imports. `make test-slow` runs them without it: the
embedded-model experiments the notebooks report (minutes to hours each on a 2-core CPU).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
SMALL_CELL_TIMEOUT_S = 300  # a planted-model cell takes seconds; this only catches a hang
FULL_CELL_TIMEOUT_S = 4 * 3600  # the full factual run (240 prompts, 11 scale factors) is the longest cell


def execute(path: Path, monkeypatch: pytest.MonkeyPatch, small: bool, timeout: int) -> None:
    if small:
        monkeypatch.setenv("PROBE_NOTEBOOK_SMALL", "1")
    else:
        monkeypatch.delenv("PROBE_NOTEBOOK_SMALL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "strip outputs"
    client = NotebookClient(book, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_on_planted_models(path, monkeypatch):
    execute(path, monkeypatch, small=True, timeout=SMALL_CELL_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_the_full_experiment(path, monkeypatch):
    execute(path, monkeypatch, small=False, timeout=FULL_CELL_TIMEOUT_S)


def test_every_method_notebook_has_both_modes():
    """Each method notebook says in markdown what its CI mode runs, and switches on PROBE_NOTEBOOK_SMALL."""
    assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)
    for path in NOTEBOOKS:
        if path.name == "00_quickstart.ipynb":
            continue
        book = nbformat.read(path, as_version=4)
        markdown = "\n".join(c.source for c in book.cells if c.cell_type == "markdown")
        code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
        assert "planted model" in markdown and "What we found, and limits" in markdown, path.name
        assert "PROBE_NOTEBOOK_SMALL" in code and "planted." in code and "load_model(" in code, path.name


def test_notebooks_are_what_the_builder_writes():
    """The .ipynb files are generated: editing one by hand (or forgetting to regenerate) fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS[0].parent / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert sorted(builder.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        written = nbformat.writes(builder.notebook(builder.NOTEBOOKS[path.name]))
        assert written.rstrip("\n") == path.read_text().rstrip("\n"), f"{path.name}: run notebooks/build_notebooks.py"
