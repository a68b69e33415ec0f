"""The code's shape: `probe/` imports form a DAG, no source file is too long (tools/check_structure.py)."""

from __future__ import annotations

from pathlib import Path

from tools import check_structure


def test_probe_imports_form_a_dag_with_function_level_imports_counted():
    assert check_structure.cycles(check_structure.import_graph()) == []


def test_no_source_file_in_the_product_exceeds_the_limit():
    assert check_structure.long_files() == []


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_held_together_by_a_function_level_import_is_found(tmp_path):
    _package(tmp_path, {
        "probe/__init__.py": "",
        "probe/a.py": "from probe.b import thing\n",
        "probe/b.py": "def thing():\n    from probe import a\n    return a\n",
        "probe/c.py": "from . import a\n",
    })
    graph = check_structure.import_graph(root=tmp_path)
    assert graph["probe.c"] == {"probe.a"}
    assert check_structure.cycles(graph) == [["probe.a", "probe.b"]]


def test_relative_and_type_checking_imports_count_and_names_resolve_to_modules(tmp_path):
    _package(tmp_path, {
        "probe/__init__.py": "",
        "probe/sub/__init__.py": "from ..top import X\n",
        "probe/top.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from probe.sub import leaf\nX = 1\n",
        "probe/sub/leaf.py": "import probe.top as top\n",
    })
    graph = check_structure.import_graph(root=tmp_path)
    assert graph["probe.sub"] == {"probe.top"}
    assert graph["probe.top"] == {"probe.sub", "probe.sub.leaf"}
    assert check_structure.cycles(graph) == [["probe.sub", "probe.sub.leaf", "probe.top"]]


def test_long_files_are_listed_longest_first(tmp_path):
    _package(tmp_path, {"probe/a.py": "x = 1\n" * 12, "probe/b.py": "x = 1\n" * 30, "app/c.py": "x = 1\n" * 3})
    assert check_structure.long_files(("probe", "app"), limit=10, root=tmp_path) == [("probe/b.py", 30),
                                                                                      ("probe/a.py", 12)]
