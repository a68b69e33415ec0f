"""The code's shape, checked: `probe/` imports form a DAG and no source file is too long to read.

Every import in `probe/` counts, the ones inside functions too (an import moved into a function only
to dodge a cycle is still a cycle). Run `python -m tools.check_structure` for a report; exit 1 when a
rule is broken. `tests/core/test_structure.py` runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = "probe"
SIZED = ("probe", "analyses", "app")
MAX_LINES = 600


def module_name(path: Path, root: Path = ROOT) -> str:
    """`probe/forward.py` -> `probe.forward`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports anywhere in its body, resolved to absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def import_graph(package: str = CORE, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (names that are not modules are dropped)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_modules(path, root):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != package:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_files(folders: Iterable[str] = SIZED, limit: int = MAX_LINES, root: Path = ROOT) -> list[tuple[str, int]]:
    """Source files over `limit` lines, longest first."""
    sizes = [(str(p.relative_to(root)), len(p.read_text(encoding="utf-8").splitlines()))
             for folder in folders for p in (root / folder).rglob("*.py")]
    return sorted(((name, n) for name, n in sizes if n > limit), key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=MAX_LINES, help="most lines a source file may have")
    args = parser.parse_args(argv)
    broken = False
    for component in cycles(import_graph()):
        broken = True
        print(f"import cycle in {CORE}/: {' <-> '.join(component)}")
    for name, n in long_files(limit=args.limit):
        broken = True
        print(f"{name}: {n} lines (limit {args.limit})")
    if not broken:
        print(f"{CORE}/ imports form a DAG; no file in {', '.join(SIZED)} exceeds {args.limit} lines")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
