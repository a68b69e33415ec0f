"""A batch scan: several analyzers on one model, resumable, written to a folder as JSON + arrays.

Each finished analysis is written at once (atomically) to `<out>/results/<name>.json` with the key
of everything that determines it (model fingerprint, analyzer version, config, seed). A rerun skips
every analysis whose file carries the same key, so an interrupted scan (Ctrl-C, kill) loses only the
analysis that was running. A cached file that cannot be read is set aside (renamed, bytes kept),
reported as a "corrupt" event and recomputed. `<out>/results.json` gathers every analysis in
`<out>/results/` (schema: docs/results.schema.json), rebuilt under a lock on the folder, so scans of
different analyses into one folder, at the same time or one after another, add up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from analyses.registry import AnalyzerEntry, make_config
from probe.assets import probe_home
from probe.errors import ProbeError
from probe.files import CorruptHandler, corrupt_message, read_json_or_set_aside
from probe.models import LoadedModel, facts
from probe.runtime import poll, release_free_memory
from probe.results import ResultCache, stable_hash, to_jsonable, write_json_atomic

SCHEMA = "probe.scan/1"
LOCK_NAME = ".scan.lock"
LOCK_TIMEOUT_S = 120.0  # the lock guards only the merge and the report: seconds, never minutes
# every field a record in results.json must have (docs/results.schema.json)
RECORD_FIELDS = ("name", "key", "version", "config", "seconds", "summary", "units", "top_heads", "scores", "result")

# on_event(kind, name, payload): kind in {"skip", "start", "progress", "done", "error", "corrupt"};
# "corrupt" payload: path, moved_to, reason, message (one line saying what was set aside)
ScanEvents = Callable[[str, str, dict[str, Any]], None]


def _corrupt_event(emit: ScanEvents, name: str) -> CorruptHandler:
    def report(path: Path, moved_to: Path, reason: str) -> None:
        emit("corrupt", name, {"path": str(path), "moved_to": str(moved_to), "reason": reason,
                               "message": corrupt_message(path, moved_to, reason)})
    return report


def _check_record(record: Any) -> None:
    """A scan/run record must be an object with every field readers use (else it is corrupt)."""
    if not isinstance(record, dict):
        raise TypeError(f"a record is a JSON object, not {type(record).__name__}")
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        raise KeyError(f"record lacks {', '.join(missing)}")


@contextmanager
def scan_lock(out: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the scan folder's lock (`<out>/.scan.lock`): one writer of results.json and the report at a time.

    A lock whose holder died is released by the OS. Waiting longer than `timeout` (default
    `LOCK_TIMEOUT_S`) is a `ProbeError`; finished analyses are already in `<out>/results/` then.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_NAME, timeout=LOCK_TIMEOUT_S if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout as error:
        raise ProbeError(f"Another probe scan is still writing into {out} (its lock {out / LOCK_NAME} was held "
                         f"over {lock.timeout:.0f} s); finished analyses are kept in {out / 'results'}: "
                         "rerun the scan to gather them.") from error
    try:
        yield
    finally:
        lock.release()


@dataclass
class ScanSettings:
    analyses: list[str]
    preset: str = "quick"
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    force: bool = False
    command: str = ""


def analysis_key(model: LoadedModel, entry: AnalyzerEntry, config: Any, seed: int) -> str:
    return key_for(model.fingerprint, entry, config, seed)


def key_for(fingerprint: str, entry: AnalyzerEntry, config: Any, seed: int) -> str:
    """The key of one analysis from the model's weight fingerprint alone (a Ray driver has no model)."""
    return stable_hash({"model": fingerprint, "analyzer": entry.name, "version": entry.version(),
                        "config": to_jsonable(config), "seed": seed})


def _run_path(entry: AnalyzerEntry, key: str) -> Path:
    return probe_home() / "runs" / entry.name / f"{key}.json"


def _entry_record(model: LoadedModel, entry: AnalyzerEntry, key: str, config: Any, seed: int, result: Any,
                  seconds: float, data: str | None = None) -> dict[str, Any]:
    module = entry.load()
    scores = result.scores
    summary = module.summary(result) if hasattr(module, "summary") else ""
    record = {"name": entry.name, "key": key, "version": entry.version(), "model": model.fingerprint,
              "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "config": to_jsonable(config), "seed": seed, "created": time.time(), "seconds": round(seconds, 2),
              "summary": summary, "units": scores.units, "top_heads": [[str(h), s] for h, s in scores.top(10)],
              "scores": scores.to_json(), "result": result.to_json()}
    if data:
        record["data"] = data
    return record


def record_run(model: LoadedModel, entry: AnalyzerEntry, config: Any, seed: int, result: Any, seconds: float,
               data: str | None = None) -> dict[str, Any]:
    """Store a result computed elsewhere as a run record in `$PROBE_HOME/runs/<name>/`; returns the record.

    `run_cached` stores through here; notebooks and tests use it for a run made with custom inputs
    (a planted needle set, own samples) so the app's analyzer page can load it. Give such a run a
    short `data` description: it joins the key, so a plain `run_cached` with the same config never
    mistakes it for a run on the analyzer's own data.
    """
    key = analysis_key(model, entry, config, seed) if not data else stable_hash(
        {"key": analysis_key(model, entry, config, seed), "data": data})
    record = _entry_record(model, entry, key, config, seed, result, seconds, data)
    write_json_atomic(_run_path(entry, key), record)
    if result.scores.provenance is not None:
        ResultCache().put(result.scores.provenance, {"scores": result.scores.to_json(), "summary": record["summary"]})
    return record


def _check_is_object(record: Any) -> None:
    if not isinstance(record, dict):
        raise TypeError(f"a record is a JSON object, not {type(record).__name__}")


def cached_runs(model: LoadedModel, entry: AnalyzerEntry,
                on_corrupt: CorruptHandler | None = None) -> list[dict[str, Any]]:
    """The stored run records of this analyzer on this model (same weight fingerprint), newest first.

    Only records this version of the analyzer wrote (and can read back) are listed; files that do not
    parse are set aside and reported (`on_corrupt`, default a warning), never fatal.
    """
    folder = probe_home() / "runs" / entry.name
    records = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        record = read_json_or_set_aside(path, on_corrupt, _check_is_object)
        if record is None:
            continue
        if record.get("model") == model.fingerprint and record.get("version") == entry.version():
            record.setdefault("created", path.stat().st_mtime)
            records.append(record)
    return sorted(records, key=lambda r: r["created"], reverse=True)


def load_record(entry: AnalyzerEntry, record: dict[str, Any]) -> Any:
    """The analyzer's result object stored in a run record."""
    return entry.result_type().from_json(record["result"])


def _load_run(entry: AnalyzerEntry, path: Path, on_corrupt: CorruptHandler | None) -> tuple[Any, dict[str, Any]] | None:
    """The stored run at `path` as (result, record); None when absent or unreadable (then set aside)."""
    loaded: list[Any] = []

    def check(record: Any) -> None:
        _check_record(record)
        loaded.append(load_record(entry, record))

    record = read_json_or_set_aside(path, on_corrupt, check)
    return None if record is None else (loaded[0], record)


def run_cached(model: LoadedModel, entry: AnalyzerEntry, config: Any, seed: int, force: bool = False,
               progress: Callable[[float, str], None] | None = None,
               on_corrupt: CorruptHandler | None = None) -> tuple[Any, dict[str, Any], bool]:
    """Run one analyzer, or load its result from `$PROBE_HOME/runs/` if the same key ran before.

    Returns (result, record, loaded_from_cache). The app's analyzer pages and the scan share this.
    A stored run that cannot be read back is set aside, reported to `on_corrupt` (default: a
    `CorruptFileWarning`) and computed again.
    """
    path = _run_path(entry, analysis_key(model, entry, config, seed))
    stored = None if force else _load_run(entry, path, on_corrupt)
    if stored is not None:
        return stored[0], stored[1], True
    start = time.perf_counter()
    result = entry.load().run(model, config, progress=progress)
    record = record_run(model, entry, config, seed, result, time.perf_counter() - start)
    return result, record, False


def run_scan(model: LoadedModel, entries: Sequence[AnalyzerEntry], settings: ScanSettings, out: Path,
             on_event: ScanEvents | None = None) -> dict[str, Any]:
    """Run (or resume) the scan into `out`; returns the results document (every analysis in the folder)."""
    emit = on_event or (lambda kind, name, payload: None)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "arrays").mkdir(exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for entry in entries:
        config = make_config(entry, settings.preset, settings.overrides.get(entry.name), settings.seed)
        key = analysis_key(model, entry, config, settings.seed)
        saved = None if settings.force else finished_record(out, entry.name, key, emit)
        if saved is not None:
            records[entry.name] = saved
            emit("skip", entry.name, {"seconds": saved["seconds"]})
            continue
        emit("start", entry.name, {})
        try:
            result, record, _ = run_cached(
                model, entry, config, settings.seed, force=settings.force,
                progress=lambda fraction, message, name=entry.name: (poll(), emit(
                    "progress", name, {"fraction": fraction, "message": message})),
                on_corrupt=_corrupt_event(emit, entry.name))
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failing analysis must not lose the others
            errors[entry.name] = f"{type(error).__name__}: {error}"
            emit("error", entry.name, {"error": errors[entry.name]})
            continue
        store_record(out, record, result.scores.scores.double().numpy())
        records[entry.name] = record
        del result
        release_free_memory()  # the next analysis starts from an unfragmented heap
        emit("done", entry.name, {"seconds": record["seconds"]})
    return finish_scan(facts(model), [entry.name for entry in entries], settings, out, records, errors, emit)


def finished_record(out: Path, name: str, key: str, emit: ScanEvents | None = None) -> dict[str, Any] | None:
    """The record in `<out>/results/<name>.json` if it carries `key` (the analysis is done), else None.

    A file that cannot be read is set aside and reported (`emit`'s "corrupt" event), then None.
    """
    emit = emit or (lambda kind, name, payload: None)
    saved = read_json_or_set_aside(out / "results" / f"{name}.json", _corrupt_event(emit, name), _check_record)
    return saved if saved is not None and saved.get("key") == key else None


def store_record(out: Path, record: dict[str, Any], scores: np.ndarray) -> None:
    """Write one finished analysis into the scan folder: `results/<name>.json` (atomic) and `arrays/<name>.npz`.

    The scan and the Ray driver (analyses.cluster, which gets records back from workers) both write here.
    """
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "arrays").mkdir(exist_ok=True)
    write_json_atomic(out / "results" / f"{record['name']}.json", record)
    np.savez(out / "arrays" / f"{record['name']}.npz", scores=np.asarray(scores, dtype=np.float64))


def finish_scan(model_facts: dict[str, Any], names: Sequence[str], settings: ScanSettings, out: Path,
                records: dict[str, dict[str, Any]], errors: dict[str, str],
                on_event: ScanEvents | None = None) -> dict[str, Any]:
    """Rebuild `<out>/results.json` under the folder lock from this scan's outcomes and the folder's records.

    `model_facts` is `probe.models.facts(model)`: the driver of a Ray scan has it from a worker and
    never loads the model itself.
    """
    emit = on_event or (lambda kind, name, payload: None)
    with scan_lock(out):
        document = _gather(model_facts, names, settings, out, records, errors, emit)
        write_json_atomic(out / "results.json", document)
    return document


def _gather(model_facts: dict[str, Any], names: Sequence[str], settings: ScanSettings, out: Path,
            records: dict[str, dict[str, Any]], errors: dict[str, str], emit: ScanEvents) -> dict[str, Any]:
    """The folder's results document: this scan's outcomes plus every other analysis of this model in it.

    Called under `scan_lock`: another scan may have added analyses (and written results.json) since
    this one started; their records are read back from `<out>/results/`, their errors from the
    previous results.json, so no writer's analyses are dropped.
    """
    fingerprint = model_facts["fingerprint"]
    ran = set(names)
    previous = read_json_or_set_aside(out / "results.json", _corrupt_event(emit, "results.json"), _check_document)
    if previous is not None and previous["model"].get("fingerprint") != fingerprint:
        previous = None  # another model's scan: nothing of it belongs here
    gathered: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "results").glob("*.json")):
        if path.stem in ran:
            continue
        record = read_json_or_set_aside(path, _corrupt_event(emit, path.stem), _check_record)
        if record is not None and record.get("model") == fingerprint:
            gathered[path.stem] = record
    gathered.update(records)
    carried_errors = {name: error for name, error in (previous or {}).get("errors", {}).items()
                      if name not in ran and name not in gathered}
    old_settings = (previous or {}).get("settings", {})
    listed = [*old_settings.get("analyses", []), *names]
    commands = [*(previous or {}).get("command", "").splitlines(), settings.command]
    return {"schema": SCHEMA, "model": model_facts,
            "command": "\n".join(dict.fromkeys(c for c in commands if c)),
            "settings": {"analyses": [n for n in dict.fromkeys(listed) if n in gathered or n in errors
                                      or n in carried_errors or n in ran],
                         "preset": settings.preset, "seed": settings.seed,
                         "overrides": {**{n: o for n, o in old_settings.get("overrides", {}).items() if n not in ran},
                                       **settings.overrides}},
            "analyses": dict(sorted(gathered.items())), "errors": {**carried_errors, **errors}}


def _check_document(document: Any) -> None:
    """What `_gather` reads of a previous results.json: the model, errors, settings and command."""
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ValueError("not a scan document (an object with a model expected)")
    settings = document.get("settings", {})
    if not (isinstance(document.get("errors", {}), dict) and isinstance(settings, dict)
            and isinstance(settings.get("analyses", []), list) and isinstance(settings.get("overrides", {}), dict)
            and isinstance(document.get("command", ""), str)):
        raise ValueError("errors, settings or command of the wrong type")
