"""The CLI on Ray: `probe scan --ray [ADDRESS]` and `probe sweep PLAN` drive `analyses.cluster` and print
one line per job event."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli_output import _one_line, console
from app.cli_parse import _command_line, check_out_folder
from probe.errors import ProbeError


def _cluster_events(kind: str, name: str, payload: dict) -> None:
    """One line per job event of a Ray scan or sweep (tasks report when they end, not while they run)."""
    if kind == "skip":
        console.print(f"{name}: already done ({payload['seconds']:.1f} s), skipped (use --force to redo)",
                      markup=False, soft_wrap=True)
    elif kind == "start":
        resources = payload["resources"]
        console.print(f"{name}: submitted ({resources['num_cpus']} CPU, {resources['num_gpus']} GPU)",
                      markup=False, soft_wrap=True)
    elif kind == "done":
        console.print(f"{name}: done in {payload['seconds']:.1f} s on {payload.get('node')}", markup=False, soft_wrap=True)
    elif kind == "error":
        console.print(f"{name} failed: {_one_line(payload['error'])}", markup=False, soft_wrap=True)
    elif kind == "corrupt":
        console.print(f"warning: {payload['message']}", markup=False, soft_wrap=True)


def _check_cluster_options(args: argparse.Namespace) -> None:
    from probe.parallel import import_ray

    if getattr(args, "device_map", None) or getattr(args, "max_memory", None):
        raise ProbeError("--device-map/--max-memory split one model over one machine's devices; on Ray each task "
                         "loads its model whole (drop them, or run `probe scan` without --ray on that machine).")
    import_ray()  # `pip install probe[cluster]` when it is missing, before anything starts


def _scan_on_ray(args: argparse.Namespace, entries: list, overrides: dict, out: Path) -> int:
    """`probe scan --ray [ADDRESS]`: each analysis a Ray task; the records come back here and land in --out."""
    from analyses.cluster import SHARDABLE, Job, check_spec, run_jobs
    from probe.parallel import ModelSource

    check_spec(args.model)
    _check_cluster_options(args)
    source = ModelSource(args.model, args.device, args.dtype)
    threads = args.threads or 1  # a task's threads are its CPU request: explicit, never automatic
    jobs = [Job(source, entry.name, str(out.resolve()), args.preset, args.seed, dict(overrides.get(entry.name, {})),
                threads, args.shards if entry.name in SHARDABLE else 1) for entry in entries]
    documents = run_jobs(jobs, Path("."), address=args.ray or None, force=args.force, on_event=_cluster_events,
                         command=_command_line())
    document = documents[str(out.resolve())]
    for name, record in document["analyses"].items():
        top = ", ".join(f"{h} ({s:.3g})" for h, s in record["top_heads"][:3])
        console.print(f"{name:10s} {record['seconds']:7.1f} s   top: {top}")
    if "model" in document:
        console.print(f"report: {(out / 'report.html').resolve()}\n        {(out / 'results.json').resolve()}")
    return 1 if any(entry.name in document["errors"] for entry in entries) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`probe sweep plan.yaml`: models x analyses x seeds x variants on Ray, one scan folder per cell."""
    from analyses.cluster import read_plan, run_jobs, write_index

    plan = read_plan(args.plan)
    if not (args.out or plan.out):
        raise ProbeError(f"Give the output folder: --out DIR, or `out:` in {args.plan}.")
    out = Path(args.out or plan.out)
    check_out_folder(out)
    _check_cluster_options(args)
    jobs = plan.jobs()
    console.print(f"sweep: {len(plan.models)} model(s) x {len(plan.analyses)} analyses x {len(plan.seeds)} seed(s) x "
                  f"{len(plan.variants)} variant(s) = {len(jobs)} jobs into {out}", markup=False, soft_wrap=True)
    documents = run_jobs(jobs, out, address=args.ray or None, force=args.force, on_event=_cluster_events,
                         command=_command_line())
    index = write_index(out, plan, documents)
    failed = 0
    for folder, document in documents.items():
        errors = {k: v for k, v in document.get("errors", {}).items() if k in plan.analyses}
        failed += len(errors)
        done = sorted(set(document.get("analyses", {})) & set(plan.analyses))
        console.print(f"{folder}: {len(done)} done" + (f", {len(errors)} failed ({', '.join(errors)})" if errors else ""),
                      markup=False, soft_wrap=True)
    console.print(f"index: {index.resolve()}", markup=False, soft_wrap=True)
    return 1 if failed else 0
