"""Scans on a Ray cluster: `probe scan --ray` and `probe sweep plan.yaml`.

Each analysis of each (model, seed, variant) is one Ray task (`Job`) with its resources: a GPU where
the job runs on CUDA, else `threads` CPUs, and exactly `threads` torch threads inside. The task
loads the model on its node (assets from that node's `probe fetch`; one model kept per worker
process), runs the analyzer and returns the record and the score array; the driver writes them into
the scan folder layout of `analyses.scan` (`<folder>/results/<analysis>.json`, `arrays/`, then
`results.json` and the report rebuilt), so no file system is shared. Each record is written the
moment it arrives: a driver stopped later loses nothing finished.

Before any analysis runs, one small task per model reads its weight fingerprint (`describe`); the
driver then computes every job's key exactly as `analyses.scan` does and skips the jobs whose record
in the folder carries it. A worker process lost mid-task (killed, out of memory, node gone) is
retried by Ray (`max_retries`); an analyzer's own error is not retried but recorded, as in a scan.

A job with `shards > 1` runs its analyzer with a `probe.parallel.RayMapper` of that many actors, so
an analyzer that maps over independent items (`probe.parallel.map_items`; `SHARDABLE`) spreads them
over the cluster; the merge is the serial code, so the result equals the serial one.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from analyses.registry import ANALYZERS, check_sections, load_yaml, make_config, resolve
from analyses.scan import ScanSettings, _entry_record, analysis_key, finish_scan, finished_record, key_for, \
    scan_lock, store_record
from probe.errors import ProbeError
from probe.parallel import ModelSource, RayMapper, import_ray, using

SHARDABLE = ("retrieval", "safety", "cdt")  # analyzers whose work goes through probe.parallel.map_items
MAX_RETRIES = 3             # Ray reruns a task whose worker process died this many times
SWEEP_INDEX = "sweep.json"
Events = Callable[[str, str, dict[str, Any]], None]  # (kind, "folder/analysis", payload)


@dataclass(frozen=True)
class Job:
    """One analysis of one model/seed/variant, as a Ray task gets it (plain, picklable data)."""

    source: ModelSource
    analysis: str
    folder: str                 # the scan folder (relative to the sweep's out, or absolute for `probe scan`)
    preset: str = "quick"
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # this analysis's settings
    threads: int = 1
    shards: int = 1
    force: bool = False         # recompute even if the worker's own run cache has it

    @property
    def name(self) -> str:
        return f"{self.folder}/{self.analysis}"


# ---- the worker side ---------------------------------------------------------------------------------

_WORKER_MODEL: dict[ModelSource, Any] = {}  # one model per worker process: the last one used


def _model_for(source: ModelSource, threads: int) -> Any:
    from probe.runtime import set_threads

    set_threads(threads)
    if source not in _WORKER_MODEL:
        _WORKER_MODEL.clear()  # release the previous model before loading the next
        _WORKER_MODEL[source] = source.load()
    return _WORKER_MODEL[source]


def describe(source: ModelSource, threads: int) -> dict[str, Any]:
    """Task: the model's facts (`probe.models.facts`, with its weight fingerprint) as a node loads it."""
    from probe.models import facts

    return facts(_model_for(source, threads))


def run_job(job: Job) -> dict[str, Any]:
    """Task: run one analysis on this node; returns {"record", "scores"} or {"error"} (never raises for an
    analyzer's failure, which a retry would not fix; a lost worker is Ray's to retry)."""
    from analyses.scan import run_cached

    model = _model_for(job.source, job.threads)
    entry = ANALYZERS[job.analysis]
    started = time.perf_counter()
    try:
        config = make_config(entry, job.preset, job.overrides, job.seed)
        if job.shards > 1 and job.analysis in SHARDABLE:
            with RayMapper(job.source, job.shards, job.threads) as mapper, using(mapper):
                result = entry.load().run(model, config)
            record = _entry_record(model, entry, analysis_key(model, entry, config, job.seed), config, job.seed,
                                   result, time.perf_counter() - started)
        else:
            result, record, _ = run_cached(model, entry, config, job.seed, force=job.force)
    except Exception as error:  # noqa: BLE001 - reported like a scan's failing analysis
        return {"error": f"{type(error).__name__}: {error}", "node": os.uname().nodename,
                "traceback": traceback.format_exc()}
    return {"record": record, "scores": result.scores.scores.double().numpy(), "node": os.uname().nodename}


# ---- the driver side ---------------------------------------------------------------------------------

def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """`ray` connected: to `address` (a running cluster: `ray start --head` printed it; "auto" finds the
    local one), or a local cluster started here when None; an already connected driver is kept."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ProbeError(f"Cannot connect to the Ray cluster at {address or 'a new local cluster'}: "
                             f"{' '.join(str(error).split())[:200]}") from None
    return ray


def _resolve_device(ray: Any, source: ModelSource) -> ModelSource:
    """Device None: CUDA when the cluster has GPUs, else CPU (the task's resource request follows it)."""
    if source.device is not None:
        return source
    return replace(source, device="cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")


def _options(job: Job) -> dict[str, Any]:
    gpus = 1 if job.source.uses_gpu() else 0
    return {"num_cpus": job.threads, "num_gpus": gpus, "max_retries": MAX_RETRIES, "retry_exceptions": False}


def run_jobs(jobs: Sequence[Job], out: Path, address: str | None = None, force: bool = False,
             on_event: Events | None = None, command: str = "") -> dict[str, dict[str, Any]]:
    """Run (or resume) `jobs` on Ray; returns each scan folder's results document, by folder name.

    Folders are `out / job.folder`. Finished jobs (same key in the folder) are skipped unless `force`.
    """
    emit = on_event or (lambda kind, name, payload: None)
    ray = connect(address)
    jobs = [replace(job, source=_resolve_device(ray, job.source)) for job in jobs]
    remote_describe = ray.remote(describe)
    remote_job = ray.remote(run_job)
    sources = list(dict.fromkeys(job.source for job in jobs))
    threads = {job.source: job.threads for job in jobs}
    described = {s: remote_describe.options(num_cpus=threads[s], num_gpus=1 if s.uses_gpu() else 0,
                                            max_retries=MAX_RETRIES).remote(s, threads[s]) for s in sources}
    facts: dict[ModelSource, dict[str, Any]] = {}
    failed: dict[ModelSource, str] = {}
    for source, ref in described.items():
        try:
            facts[source] = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - a model that does not load on the cluster fails its jobs only
            cause = getattr(error, "cause", None) or error
            failed[source] = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
            emit("error", source.spec, {"error": f"cannot load {source.spec}: {failed[source]}"})
    records: dict[str, dict[str, dict[str, Any]]] = {}
    errors: dict[str, dict[str, str]] = {}
    pending: dict[Any, Job] = {}
    for job in jobs:
        folder = out / job.folder
        records.setdefault(job.folder, {})
        errors.setdefault(job.folder, {})
        if job.source in failed:
            errors[job.folder][job.analysis] = failed[job.source]
            continue
        entry = ANALYZERS[job.analysis]
        config = make_config(entry, job.preset, job.overrides, job.seed)
        key = key_for(facts[job.source]["fingerprint"], entry, config, job.seed)
        saved = None if force else finished_record(folder, job.analysis, key, _folder_events(emit, job.folder))
        if saved is not None:
            records[job.folder][job.analysis] = saved
            emit("skip", job.name, {"seconds": saved["seconds"]})
            continue
        pending[remote_job.options(**_options(job)).remote(replace(job, force=force))] = job
        emit("start", job.name, {"resources": _options(job)})
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - retries spent (worker lost MAX_RETRIES + 1 times)
                cause = getattr(error, "cause", None) or error
                outcome = {"error": f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"}
            if "error" in outcome:
                errors[job.folder][job.analysis] = outcome["error"]
                emit("error", job.name, {"error": outcome["error"], "traceback": outcome.get("traceback", "")})
                continue
            record = outcome["record"]
            if record["model"] != facts[job.source]["fingerprint"]:
                errors[job.folder][job.analysis] = (
                    f"node {outcome.get('node')} loaded {job.source.spec} with weight fingerprint {record['model']}, "
                    f"not {facts[job.source]['fingerprint']}: run `probe fetch` on every node (same assets)")
                emit("error", job.name, {"error": errors[job.folder][job.analysis]})
                continue
            store_record(out / job.folder, record, outcome["scores"])
            records[job.folder][job.analysis] = record
            emit("done", job.name, {"seconds": record["seconds"], "node": outcome.get("node")})
    documents: dict[str, dict[str, Any]] = {}
    for folder_name in records:
        group = [job for job in jobs if job.folder == folder_name]
        first = group[0]
        if first.source in failed:  # nothing ran: the error travels back, the folder is left as it was
            documents[folder_name] = {"analyses": {}, "errors": errors[folder_name]}
            continue
        settings = ScanSettings(analyses=[job.analysis for job in group], preset=first.preset, seed=first.seed,
                                overrides={job.analysis: job.overrides for job in group if job.overrides},
                                force=force, command=command)
        documents[folder_name] = finish_scan(facts[first.source], settings.analyses, settings, out / folder_name,
                                             records[folder_name], errors[folder_name],
                                             _folder_events(emit, folder_name))
        write_folder_report(out / folder_name)
    return documents


def write_folder_report(folder: Path) -> None:
    from analyses.report import write_reports

    with scan_lock(folder):
        write_reports(folder)


def _folder_events(emit: Events, folder: str) -> Callable[[str, str, dict[str, Any]], None]:
    return lambda kind, name, payload: emit(kind, f"{folder}/{name}", payload)


# ---- plan files (`probe sweep`) ---------------------------------------------------------------------

PLAN_KEYS = ("models", "analyses", "seeds", "preset", "device", "dtype", "threads", "config", "variants",
             "shards", "out")
PRESETS = ("quick", "default")
DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class Plan:
    """A sweep: models x analyses x seeds x variants (named config overrides), each cell a `Job`."""

    models: tuple[str, ...]
    analyses: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    preset: str = "quick"
    device: str | None = None
    dtype: str = "float32"
    threads: int = 1
    variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {"base": {}})
    shards: dict[str, int] = field(default_factory=dict)
    out: str | None = None

    def folder(self, model: str, seed: int, variant: str) -> str:
        return f"{_slug(model)}_seed{seed}_{_slug(variant)}"

    def jobs(self) -> list[Job]:
        return [Job(ModelSource(model, self.device, self.dtype), analysis, self.folder(model, seed, variant),
                    self.preset, seed, dict(overrides.get(analysis, {})), self.threads, self.shards.get(analysis, 1))
                for model in self.models for seed in self.seeds for variant, overrides in self.variants.items()
                for analysis in self.analyses]


def check_spec(spec: str) -> str:
    """A model spec the nodes can load by name (`probe models`; hf:/gguf: paths are checked on the node)."""
    from probe.models import PATH_PREFIXES, REGISTERED_SPECS, SPECS

    if spec in SPECS or spec in REGISTERED_SPECS or spec.startswith(PATH_PREFIXES):
        return spec
    close = difflib.get_close_matches(spec, [*SPECS, *REGISTERED_SPECS], 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ProbeError(f"Unknown model spec {spec!r}{hint}; valid: {', '.join([*SPECS, *REGISTERED_SPECS])}, "
                     "hf:<dir or hub id>, gguf:<file>.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def read_plan(path: str | Path) -> Plan:
    """A plan file (see configs/sweep_example.yaml), checked whole before anything runs: a one-line
    `ProbeError` names the first problem (unknown key with the closest valid one, wrong type, unknown
    analysis or setting, a setting of the wrong type)."""
    path = Path(path)
    where = f"Plan {path}"
    data = load_yaml(path, "Plan")
    if not isinstance(data, dict):
        raise ProbeError(f"{where} must be a mapping with at least `models:` and `analyses:`, not "
                         f"{type(data).__name__}.")
    for key in data:
        if key not in PLAN_KEYS:
            close = difflib.get_close_matches(str(key), PLAN_KEYS, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProbeError(f"{where}: unknown key {key!r}{hint}; keys: {', '.join(PLAN_KEYS)}.")

    def names(key: str, required: bool = True) -> tuple[str, ...]:
        value = data.get(key)
        if value is None and not required:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ProbeError(f"{where}: `{key}` must be a non-empty list of names, not {value!r}.")
        return tuple(v.strip() for v in value)

    models = names("models")
    for model in models:
        try:
            check_spec(model)
        except ProbeError as error:
            raise ProbeError(f"{where}: {error}") from None
    analyses = tuple(e.name for e in resolve(",".join(names("analyses"))))
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and 0 <= s < 2**32 for s in seeds):
        raise ProbeError(f"{where}: `seeds` must be a list of integers 0..2^32-1, not {data.get('seeds')!r}.")
    preset = data.get("preset", "quick")
    if preset not in PRESETS:
        raise ProbeError(f"{where}: `preset` must be one of {', '.join(PRESETS)}, not {preset!r}.")
    device = data.get("device")
    if device is not None and (not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device)):
        raise ProbeError(f"{where}: `device` must be cpu, cuda or null (cuda where the cluster has GPUs), not {device!r}.")
    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ProbeError(f"{where}: `dtype` must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    threads = data.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
        raise ProbeError(f"{where}: `threads` (torch CPU threads per task) must be an integer 1..256, not {threads!r}.")
    common = _sections(data.get("config"), f"{where}: config")
    raw_variants = data.get("variants") or {"base": {}}
    if not isinstance(raw_variants, dict) or not all(isinstance(k, str) and k for k in raw_variants):
        raise ProbeError(f"{where}: `variants` must map variant names to config overrides "
                         "({analysis: {setting: value}}), not " + repr(raw_variants)[:80] + ".")
    variants = {}
    for name, overrides in raw_variants.items():
        own = _sections(overrides, f"{where}: variant {name!r}")
        merged = {a: {**common.get(a, {}), **own.get(a, {})} for a in {*common, *own}}
        for analysis in analyses:  # names and types of every setting, before any task starts
            make_config(ANALYZERS[analysis], preset, merged.get(analysis), seeds[0])
        variants[name] = merged
    shards = data.get("shards") or {}
    if not isinstance(shards, dict):
        raise ProbeError(f"{where}: `shards` must map analyses to shard counts, e.g. {{retrieval: 4}}, not {shards!r}.")
    for analysis, count in shards.items():
        if analysis not in SHARDABLE:
            raise ProbeError(f"{where}: shards for {analysis!r}: only {', '.join(SHARDABLE)} split into shards.")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
            raise ProbeError(f"{where}: shards.{analysis} must be an integer 1..1024, not {count!r}.")
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise ProbeError(f"{where}: `out` must be a folder path, not {out!r}.")
    return Plan(models, analyses, tuple(seeds), preset, device, dtype, threads, variants, dict(shards), out)


def _sections(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProbeError(f"{where} must map analysis names to settings, e.g. `retrieval: {{lengths: [512]}}`, "
                         f"not {type(value).__name__}.")
    return check_sections(value, where)


def write_index(out: Path, plan: Plan, documents: dict[str, dict[str, Any]]) -> Path:
    """`<out>/sweep.json`: which folder holds which model, seed and variant, and what finished there."""
    from probe.results import write_json_atomic

    cells = []
    for model in plan.models:
        for seed in plan.seeds:
            for variant in plan.variants:
                folder = plan.folder(model, seed, variant)
                document = documents.get(folder, {})
                cells.append({"folder": folder, "model": model, "seed": seed, "variant": variant,
                              "done": sorted(set(document.get("analyses", {})) & set(plan.analyses)),
                              "errors": {k: v for k, v in document.get("errors", {}).items() if k in plan.analyses}})
    path = out / SWEEP_INDEX
    write_json_atomic(path, {"schema": "probe.sweep/1", "analyses": list(plan.analyses), "cells": cells})
    return path
