"""A batch scan: several analyzers on one model, resumable, written to a folder as JSON + arrays.

Each finished analysis is written at once (atomically) to `<out>/results/<name>.json` with the key
of everything that determines it (model fingerprint, analyzer version, config, seed). A rerun skips
every analysis whose file carries the same key, so an interrupted scan (Ctrl-C, kill) loses only the
analysis that was running. `<out>/results.json` gathers them (schema: docs/results.schema.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analyses.registry import AnalyzerEntry, make_config
from probe.assets import probe_home
from probe.models import LoadedModel, facts
from probe.results import ResultCache, stable_hash, to_jsonable, write_json_atomic

SCHEMA = "probe.scan/1"

# on_event(kind, name, payload): kind in {"skip", "start", "progress", "done", "error"}
ScanEvents = Callable[[str, str, dict[str, Any]], None]


@dataclass
class ScanSettings:
    analyses: list[str]
    preset: str = "quick"
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    force: bool = False
    command: str = ""


def analysis_key(model: LoadedModel, entry: AnalyzerEntry, config: Any, seed: int) -> str:
    return stable_hash({"model": model.fingerprint, "analyzer": entry.name, "version": entry.version(),
                        "config": to_jsonable(config), "seed": seed})


def _run_path(entry: AnalyzerEntry, key: str) -> Path:
    return probe_home() / "runs" / entry.name / f"{key}.json"


def _entry_record(model: LoadedModel, entry: AnalyzerEntry, key: str, config: Any, seed: int, result: Any,
                  seconds: float, data: str | None = None) -> dict[str, Any]:
    module = entry.load()
    scores = result.scores
    summary = module.summary(result) if hasattr(module, "summary") else ""
    record = {"name": entry.name, "key": key, "version": entry.version(), "model": model.fingerprint,
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


def cached_runs(model: LoadedModel, entry: AnalyzerEntry) -> list[dict[str, Any]]:
    """The stored run records of this analyzer on this model (same weight fingerprint), newest first.

    Only records this version of the analyzer wrote (and can read back) are listed; unreadable files
    are skipped, not fatal.
    """
    folder = probe_home() / "runs" / entry.name
    records = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("model") == model.fingerprint and record.get("version") == entry.version():
            record.setdefault("created", path.stat().st_mtime)
            records.append(record)
    return sorted(records, key=lambda r: r["created"], reverse=True)


def load_record(entry: AnalyzerEntry, record: dict[str, Any]) -> Any:
    """The analyzer's result object stored in a run record."""
    return entry.result_type().from_json(record["result"])


def run_cached(model: LoadedModel, entry: AnalyzerEntry, config: Any, seed: int, force: bool = False,
               progress: Callable[[float, str], None] | None = None) -> tuple[Any, dict[str, Any], bool]:
    """Run one analyzer, or load its result from `$PROBE_HOME/runs/` if the same key ran before.

    Returns (result, record, loaded_from_cache). The app's analyzer pages and the scan share this.
    """
    path = _run_path(entry, analysis_key(model, entry, config, seed))
    if path.exists() and not force:
        record = json.loads(path.read_text())
        return load_record(entry, record), record, True
    start = time.perf_counter()
    result = entry.load().run(model, config, progress=progress)
    record = record_run(model, entry, config, seed, result, time.perf_counter() - start)
    return result, record, False


def run_scan(model: LoadedModel, entries: Sequence[AnalyzerEntry], settings: ScanSettings, out: Path,
             on_event: ScanEvents | None = None) -> dict[str, Any]:
    """Run (or resume) the scan into `out`; returns the results document."""
    emit = on_event or (lambda kind, name, payload: None)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "arrays").mkdir(exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for entry in entries:
        config = make_config(entry, settings.preset, settings.overrides.get(entry.name), settings.seed)
        key = analysis_key(model, entry, config, settings.seed)
        path = out / "results" / f"{entry.name}.json"
        if path.exists() and not settings.force:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                records[entry.name] = saved
                emit("skip", entry.name, {"seconds": saved["seconds"]})
                continue
        emit("start", entry.name, {})
        try:
            result, record, _ = run_cached(
                model, entry, config, settings.seed, force=settings.force,
                progress=lambda fraction, message, name=entry.name: emit(
                    "progress", name, {"fraction": fraction, "message": message}))
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failing analysis must not lose the others
            errors[entry.name] = f"{type(error).__name__}: {error}"
            emit("error", entry.name, {"error": errors[entry.name]})
            continue
        write_json_atomic(path, record)
        np.savez(out / "arrays" / f"{entry.name}.npz", scores=result.scores.scores.double().numpy())
        records[entry.name] = record
        emit("done", entry.name, {"seconds": record["seconds"]})
    document = {"schema": SCHEMA, "model": facts(model), "command": settings.command,
                "settings": {"analyses": [e.name for e in entries], "preset": settings.preset, "seed": settings.seed,
                             "overrides": settings.overrides},
                "analyses": records, "errors": errors}
    write_json_atomic(out / "results.json", document)
    return document
