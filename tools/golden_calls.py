"""Golden hashes of what the analyzers compute, for refactors that must keep every number bit-equal.

A pytest plugin: every public function of the `analyses` packages is wrapped (in every module that
binds it, so calls from inside a package are seen too) and each call's return value is hashed
(tensors by dtype, shape and bytes; results through their JSON with timing fields dropped). The
hashes are keyed by test id, function name and call number, and written to `$GOLDEN_OUT` at the end.

    GOLDEN_OUT=before.json python -m pytest -p tools.golden_calls -m "not slow" tests/...
    ... change the code ...
    GOLDEN_OUT=after.json python -m pytest -p tools.golden_calls -m "not slow" tests/...
    python -m tools.golden_calls before.json after.json

The comparison lists the keys whose hashes differ, and how many keys only one side has (a test
that now imports a function from elsewhere is not seen by the wrapper: such keys are counted, not
compared). Module paths are not part of the key, so moving a function to another module is free.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGES = ("analyses",)
TIMING = re.compile(r"(created|seconds|elapsed|time|timing|duration|wall|_s$|^started|^finished)", re.I)
_records: dict[str, str] = {}
_counters: defaultdict[tuple[str, str], int] = defaultdict(int)
_current = ["<collection>"]
_depth = [0]
# GOLDEN_DUMP=name1,name2: also keep the repr of those functions' results (in `$GOLDEN_OUT.dump.json`),
# to read what differs.
_dumped = set(filter(None, os.environ.get("GOLDEN_DUMP", "").split(",")))
_dumps: dict[str, str] = {}


def _digest(value: Any, out: Any, seen: set[int]) -> None:
    """Feed a canonical, timing-free rendering of `value` into the hash `out`."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        out.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        out.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return
    if isinstance(value, (str, int, bool, type(None))):
        out.update(repr(value).encode())
        return
    if isinstance(value, float):
        out.update(value.hex().encode() if value == value else b"nan")
        return
    if isinstance(value, enum.Enum):
        out.update(f"E{type(value).__name__}.{value.name}".encode())
        return
    if id(value) in seen:
        out.update(b"<cycle>")
        return
    seen = seen | {id(value)}
    if isinstance(value, dict):
        out.update(b"{")
        for key in sorted(value, key=str):
            if isinstance(key, str) and TIMING.search(key):
                continue
            out.update(str(key).encode() + b":")
            _digest(value[key], out, seen)
        out.update(b"}")
        return
    if isinstance(value, (list, tuple)):
        out.update(b"[")
        for item in value:
            _digest(item, out, seen)
        out.update(b"]")
        return
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            out.update(f"N{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
            return
        if isinstance(value, np.generic):
            _digest(value.item(), out, seen)
            return
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out.update(f"D{type(value).__name__}".encode())
        _digest({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, out, seen)
        return
    out.update(f"<{type(value).__name__}>".encode())


def digest(value: Any) -> str:
    out = hashlib.sha256()
    _digest(value, out, set())
    return out.hexdigest()[:20]


def _wrapped(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        _depth[0] += 1
        try:
            result = function(*args, **kwargs)
        finally:
            _depth[0] -= 1
        if inspect.isgenerator(result) or hasattr(result, "__enter__"):
            return result
        key = (_current[0], name)
        _counters[key] += 1
        _records[f"{key[0]}::{name}#{_counters[key]}"] = digest(result)
        if name in _dumped:
            _dumps[f"{key[0]}::{name}#{_counters[key]}"] = repr(result)[:20000]
        return result

    call.__golden__ = True  # type: ignore[attr-defined]
    return call


def install() -> int:
    """Wrap every public function defined in PACKAGES, in every module that binds it; return the count."""
    modules = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # an optional module that does not import here is simply not watched
                continue
    originals: dict[int, tuple[str, Callable[..., Any]]] = {}
    for module in modules:
        for name, value in vars(module).items():
            if (inspect.isfunction(value) and not name.startswith("_") and not getattr(value, "__golden__", False)
                    and value.__module__.split(".")[0] in PACKAGES):
                originals.setdefault(id(value), (name, value))
    wrappers = {key: _wrapped(name, function) for key, (name, function) in originals.items()}
    for module in modules:
        for name, value in list(vars(module).items()):
            if id(value) in wrappers:
                setattr(module, name, wrappers[id(value)])
    return len(wrappers)


def pytest_configure(config: Any) -> None:
    count = install()
    sys.stderr.write(f"golden_calls: watching {count} functions\n")


def pytest_runtest_setup(item: Any) -> None:
    _current[0] = item.nodeid.split("/")[-1]


def pytest_runtest_teardown(item: Any) -> None:
    _current[0] = "<between>"


def pytest_unconfigure(config: Any) -> None:
    target = os.environ.get("GOLDEN_OUT")
    if target:
        Path(target).write_text(json.dumps(_records, indent=0, sort_keys=True))
        if _dumps:
            Path(target + ".dump.json").write_text(json.dumps(_dumps, indent=0, sort_keys=True))


def compare(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], int, int, int]:
    shared = sorted(set(before) & set(after))
    differ = [k for k in shared if before[k] != after[k]]
    return differ, len(shared), len(set(before) - set(after)), len(set(after) - set(before))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    before, after = (json.loads(Path(p).read_text()) for p in args[:2])
    differ, shared, only_before, only_after = compare(before, after)
    print(f"{shared} calls compared, {len(differ)} differ; {only_before} only before, {only_after} only after")
    for key in differ[:50]:
        print(f"  differs: {key}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
