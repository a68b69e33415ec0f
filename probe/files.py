"""Crash-safe cache files: atomic writes that leave nothing behind, and corrupt files set aside.

A cache file is only ever replaced whole (temp file + rename), so a reader sees the old or the new
file, never half of one. A process killed mid-write cannot clean up after itself, so each temp file
names its host and process id and the next write beside it removes temp files whose writer is gone.
A cache file that does not parse (a truncated copy, a bad disk) is never fatal and never deleted:
it is renamed out of the way (`<name>.corrupt-<time>`, bytes kept), reported, and recomputed.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 3600.0  # no cache write takes an hour: an older temp file is an orphan whatever its name says

# on_corrupt(original path, where its bytes now are, why it was unreadable)
CorruptHandler = Callable[[Path, Path, str], None]


class CorruptFileWarning(UserWarning):
    """A cache file could not be read; it was set aside and will be recomputed."""


def _writer_tag() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:40] or "host"
    return f"{host}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _is_orphan(temp: Path, host: str) -> bool:
    """True for a temp file whose writer is dead (same host, pid gone) or that is older than any write."""
    try:
        age = time.time() - temp.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    tag = temp.name.removesuffix(TEMP_SUFFIX).split(".")[-2] if temp.name.endswith(TEMP_SUFFIX) else ""
    writer_host, _, pid = tag.rpartition("-")
    return writer_host == host and pid.isdigit() and not _process_alive(int(pid))


def remove_orphan_temps(path: Path) -> list[Path]:
    """Delete the temp files that killed writers of `path` left beside it; returns what was removed."""
    host = _writer_tag().rpartition("-")[0]
    removed = []
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if temp.is_file() and _is_orphan(temp, host):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write `path` through: it replaces `path` on a clean exit and is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=TEMP_SUFFIX,
                                         dir=path.parent)
    temp = Path(temp_name)
    replaced = False
    try:
        with os.fdopen(handle, mode, encoding=None if "b" in mode else "utf-8") as out:
            yield out
        os.replace(temp, path)
        replaced = True
    finally:
        if not replaced:
            temp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_writer(path) as out:
        out.write(text)


def set_aside(path: Path, reason: str, on_corrupt: CorruptHandler | None = None) -> Path | None:
    """Rename an unreadable cache file to `<name>.corrupt-<time>` (bytes kept) and report it.

    Returns the new path, or None when the file was already gone (another process set it aside or
    replaced it first). With no `on_corrupt`, the report is a `CorruptFileWarning`.
    """
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    if on_corrupt is None:
        warnings.warn(corrupt_message(path, target, reason), CorruptFileWarning, stacklevel=3)
    else:
        on_corrupt(path, target, reason)
    return target


def corrupt_message(path: Path, moved_to: Path, reason: str) -> str:
    return f"corrupt cache file {path} ({reason}); kept as {moved_to.name}, recomputing"


def read_json_or_set_aside(path: Path, on_corrupt: CorruptHandler | None = None,
                           check: Callable[[Any], None] | None = None) -> Any | None:
    """The JSON stored in `path`; None when it is absent or unreadable (then it is set aside and reported).

    `check(data)` may raise `ValueError`, `LookupError`, `TypeError` or `AttributeError` for a file
    that parses but lacks what its reader needs. A file replaced by another process while it was being read is left alone.
    """
    try:
        with path.open("rb") as handle:
            identity = os.fstat(handle.fileno()).st_ino
            raw = handle.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if check is not None:
            check(data)
    except (ValueError, LookupError, TypeError, AttributeError) as error:  # JSONDecodeError, UnicodeDecodeError: ValueError
        try:
            unchanged = path.stat().st_ino == identity
        except FileNotFoundError:
            unchanged = False
        if unchanged:
            set_aside(path, one_line(error), on_corrupt)
        return None
    return data


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__
