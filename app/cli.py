"""The `probe` command line: models, fetch, run, scan, sweep, report, compare, organism, doctor.

Every user mistake surfaces as a `ProbeError` and is printed as one clear message (exit code 2),
never as a traceback. Beside this file: cli_parse (input checks, interventions), cli_output (the
console, strict JSON), cli_cluster (Ray scans and sweeps), documents (reading scan results back).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from analyses.specs import register_analysis_specs
from app.cli_cluster import _scan_on_ray, cmd_sweep
from app.cli_output import _one_line, console, dumps_json, finite_json
from app.cli_parse import _command_line, build_interventions, check_ablate, check_out_folder, check_text, read_scale
from app.documents import _DOCUMENT_ERRORS, _model_line, read_document
from probe import assets
from probe.errors import ProbeError
from probe.models import DEFAULT_MODEL, LoadedModel, load_model, spec_summary
from probe.runtime import MAX_THREADS_PER_CORE, adaptive_policy, set_threads


def _load(args: argparse.Namespace) -> LoadedModel:
    threads = set_threads(getattr(args, "threads", 0))
    start = time.perf_counter()
    with console.status(f"Loading {args.model} ...") as status:
        from probe.models import parse_device_map, parse_max_memory

        model = load_model(args.model, device=args.device, dtype=args.dtype,
                           device_map=parse_device_map(getattr(args, "device_map", None)),
                           max_memory=parse_max_memory(getattr(args, "max_memory", None)),
                           offload_folder=getattr(args, "offload_folder", None),
                           progress=lambda message: status.update(message))
    console.print(f"[dim]{model.shape_text}; loaded in {time.perf_counter() - start:.1f} s on {model.device}"
                  f" ({threads} CPU thread{'s' if threads > 1 else ''})[/dim]")
    return model


def cmd_models(args: argparse.Namespace) -> int:
    print(spec_summary())
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    names = args.assets or list(assets.ASSETS)
    unknown = [n for n in names if n not in assets.ASSETS]
    if unknown:
        raise ProbeError(f"Unknown asset(s) {', '.join(unknown)}; known: {', '.join(assets.ASSETS)}.")
    for name in names:
        assets.fetch(name, log=lambda message: console.print(message), force=args.force)
    console.print(f"assets in {assets.probe_home() / 'assets'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from probe.effects import check_room, intervention_effects

    check_text("--prompt", args.prompt)
    check_ablate(args.ablate)
    for text in args.scale:
        read_scale(text)
    model = _load(args)
    if args.top > model.d_vocab:
        raise ProbeError(f"--top {args.top} is more than the {model.d_vocab} tokens of {model.spec}'s vocabulary; "
                         f"use --top 1..{model.d_vocab}.")
    check_room(model, int(model.encode(args.prompt).shape[-1]), args.generate)  # before any (mean-ablation) pass
    interventions = build_interventions(model, args.ablate, args.ablate_method, args.scale)
    with console.status("Running original and intervened passes ..."):
        result = intervention_effects(model, args.prompt, interventions, top_k=args.top, generate=args.generate)
    _, non_finite = finite_json(result.to_json())
    if args.json:
        print(dumps_json(result.to_json()))
        if non_finite:
            console.print(f"warning: {len(non_finite)} value(s) were NaN or infinite, written as null "
                          "(see non_finite in the JSON)", markup=False, soft_wrap=True)
        return 0
    if non_finite:
        console.print("warning: the intervened pass gave NaN or infinite values (an intervention overflowed "
                      f"{str(model.dtype).replace('torch.', '')}); the numbers below are not meaningful",
                      markup=False, soft_wrap=True)
    console.print(f"prompt ({result.n_tokens} tokens): {args.prompt!r}")
    applied = "; ".join(result.interventions) if result.interventions else "none"
    console.print(f"interventions applied: {applied}")
    table = Table(title="next token: original vs intervened")
    for column in ("#", "original", "p", "intervened", "p"):
        table.add_column(column, justify="right" if column in ("#", "p") else "left")
    for rank, (a, b) in enumerate(zip(result.original.top, result.intervened.top), start=1):
        table.add_row(str(rank), repr(a.token), f"{a.prob:.4f}", repr(b.token), f"{b.prob:.4f}")
    Console().print(table)
    print(f"total variation distance {result.total_variation:.4f}, KL(original||intervened) {result.kl:.4f} nats")
    if args.generate:
        print(f"original generation:   {result.original.generation!r}")
        print(f"intervened generation: {result.intervened.generation!r}")
    return 0


def _read_overrides(path: str | None) -> dict:
    """The `--config` file, bounded and checked (`analyses.registry.read_config`); {} without one."""
    from analyses.registry import read_config

    return read_config(path) if path else {}


def cmd_scan(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from analyses.registry import ANALYZERS, available, make_config, resolve
    from analyses.report import write_reports
    from analyses.scan import ScanSettings, run_scan, scan_lock

    entries = resolve(args.analyses)
    if not entries:
        raise ProbeError("No analysis to run.")
    overrides = _read_overrides(args.config)
    for entry in entries:  # every setting's name and type, before the model loads
        make_config(entry, args.preset, overrides.get(entry.name), args.seed)
    for name in set(overrides) - {e.name for e in entries}:
        if name in available():  # a section for an analysis not run this time is still checked
            make_config(ANALYZERS[name], args.preset, overrides[name], args.seed)
    out = Path(args.out)
    check_out_folder(out)
    if args.ray is not None:
        return _scan_on_ray(args, entries, overrides, out)
    if args.shards > 1:
        raise ProbeError("--shards splits an analysis over Ray actors: add --ray (a local cluster) or --ray ADDRESS.")
    settings = ScanSettings(analyses=[e.name for e in entries], preset=args.preset, seed=args.seed,
                            overrides=overrides, force=args.force, command=_command_line())
    model = _load(args)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bars:
        overall = bars.add_task(f"scan of {model.spec}", total=len(entries))
        current: dict[str, int] = {}

        def on_event(kind: str, name: str, payload: dict) -> None:
            if kind == "skip":
                console.print(f"{name}: already done ({payload['seconds']:.1f} s), skipped (use --force to redo)")
                bars.advance(overall)
            elif kind == "start":
                current[name] = bars.add_task(name, total=1.0)
            elif kind == "progress":
                bars.update(current[name], completed=payload["fraction"],
                            description=f"{name}: {payload['message']}"[:70])
            elif kind in ("done", "error"):
                bars.update(current[name], completed=1.0, description=f"{name}: {kind}")
                bars.advance(overall)
                if kind == "error":
                    console.print(f"[red]{name} failed:[/red] {payload['error']}")
            elif kind == "corrupt":
                console.print(f"[yellow]warning:[/yellow] {payload['message']}")

        document = run_scan(model, entries, settings, out, on_event)
    with scan_lock(out):  # the report is rebuilt from results.json as it is now (another scan may have added to it)
        html_path, md_path = write_reports(out)
    for name, record in document["analyses"].items():
        top = ", ".join(f"{h} ({s:.3g})" for h, s in record["top_heads"][:3])
        console.print(f"{name:10s} {record['seconds']:7.1f} s   top: {top}")
    console.print(f"report: {html_path.resolve()}\n        {md_path.resolve()}\n        {(out / 'results.json').resolve()}")
    policy = adaptive_policy()
    if policy is not None:
        moves = ", ".join(f"{threads} after {at - policy.started:.0f} s (others used {others:.1f} cores)"
                          for at, threads, others in policy.changes)
        console.print(f"[dim]threads (automatic): {moves or 'unchanged'}[/dim]")
    return 1 if any(entry.name in document["errors"] for entry in entries) else 0  # this scan's failures


def cmd_report(args: argparse.Namespace) -> int:
    from analyses.report import write_reports

    document = read_document(args.dir)
    try:
        html_path, md_path = write_reports(Path(args.dir), document)
    except OSError as error:
        raise ProbeError(f"Cannot write the report into {args.dir}: {error.strerror or error}.") from None
    except _DOCUMENT_ERRORS as error:
        raise ProbeError(f"Cannot build a report from {Path(args.dir) / 'results.json'}: "
                         f"{type(error).__name__}: {_one_line(error, 160)} (is it from this version of probe?).") from None
    console.print(f"report: {html_path}\n        {md_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analyses.report import compare_documents

    a, b = read_document(args.dir_a), read_document(args.dir_b)
    ma, mb = a["model"], b["model"]
    if (ma["n_layers"], ma["n_heads"]) != (mb["n_layers"], mb["n_heads"]):
        raise ProbeError(f"A is {_model_line(ma)}, B is {_model_line(mb)}: different shapes, so head LxHy of one "
                         "is not LxHy of the other; compare scans of the same model.")
    header = ""
    if ma["fingerprint"] != mb["fingerprint"]:
        console.print(f"warning: A and B are scans of different models (A: {_model_line(ma)}; B: {_model_line(mb)}); "
                      "heads are matched by position only (L0H1 with L0H1)", markup=False, soft_wrap=True)
        header = "DIFFERENT MODELS: heads are matched by position only\n"
    try:
        text = compare_documents(a, b, top=args.top)
    except _DOCUMENT_ERRORS as error:
        raise ProbeError(f"Cannot compare {args.dir_a} and {args.dir_b}: {type(error).__name__}: "
                         f"{_one_line(error, 160)}.") from None
    print(header + text)
    return 0


def cmd_organism(args: argparse.Namespace) -> int:
    from analyses.organism import ORGANISM_SPEC, OrganismConfig, build_refusal_organism

    start = time.perf_counter()
    config = OrganismConfig(threads=args.threads or None)
    with console.status("building the refusal organism ...") as status:
        build = build_refusal_organism(config, force=args.force, progress=lambda message: status.update(message))
    meta = build.meta
    console.print(f"organism {build.key} in {build.path} ({time.perf_counter() - start:.0f} s)")
    for key in ("harmful_refusal_rate", "harmless_refusal_rate", "build_seconds"):
        if key in meta:
            console.print(f"{key}: {meta[key]}")
    console.print(f"load it as --model {ORGANISM_SPEC}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """`probe doctor MODEL`: the architecture checks at a reduced size; exit 0 all pass, 1 any fails."""
    from analyses.doctor import DOCTOR_COLUMNS, doctor, header_lines, table_rows, timing_line

    threads = set_threads(args.threads)
    console.print(f"[dim]doctor: {args.model} on {args.device or 'the default device'}, {threads} CPU thread"
                  f"{'s' if threads > 1 else ''} ({'automatic' if not args.threads else 'fixed'})[/dim]")
    from rich.text import Text

    result = doctor(args.model, device=args.device,
                    progress=lambda fraction, message: console.print(Text(message, style="dim"), soft_wrap=True))
    policy = adaptive_policy()
    if policy is not None and policy.changes:
        moves = ", ".join(f"{n} after {at - policy.started:.0f} s" for at, n, _ in policy.changes)
        console.print(f"[dim]threads (automatic): {moves}[/dim]")
    if args.json:
        print(dumps_json(result.to_dict()))
        return result.exit_code
    out = Console()
    for line in header_lines(result):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    table = Table(title=f"doctor: {result.spec} ({result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU, "
                           f"{result.threads} thread{'s' if result.threads > 1 else ''})")
    for column in DOCTOR_COLUMNS:
        table.add_column(column, justify="right" if column in ("#", "value", "tolerance") else "left")
    for row in table_rows(result):
        table.add_row(*row)
    out.print(table)
    out.print(timing_line(result), markup=False, highlight=False, soft_wrap=True)
    failed = [c.name for c in result.checks if c.passed is False]
    skipped = [c.name for c in result.checks if c.passed is None]
    passed = "all checks pass" + (f" ({len(skipped)} skipped: {', '.join(skipped)}; see detail)" if skipped else "")
    print(passed if result.ok else f"FAILED: {', '.join(failed) or 'no check passed'}")
    return result.exit_code


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (exit code 2), pointing at `--help` for the usage."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def int_in(low: int, high: int | None = None, what: str = "") -> Any:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {bound}{what}")
        return value
    parse.__name__ = "integer"
    return parse


MAX_THREADS = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)  # the limit probe.runtime enforces
THREADS = int_in(0, MAX_THREADS, f" (0 = choose; this machine has {os.cpu_count() or 1} cores)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `probe models`)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16, float16")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over devices with accelerate: auto, balanced, sequential, "
                             "or a JSON file / inline JSON {module: device} (devices: 0, cuda:1, cpu, disk)")
    parser.add_argument("--max-memory", default=None, metavar="LIMITS",
                        help="per-device memory for --device-map, e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="folder for weights --device-map puts on 'disk' (default: a temporary folder)")
    parser.add_argument("--threads", type=THREADS, default=0,
                        help=f"torch CPU threads, up to {MAX_THREADS} (default 0: automatic, re-decided while it runs from the CPU other processes use)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="probe", description="Find and intervene on attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list model specs and whether they are available offline").set_defaults(func=cmd_models)

    fetch = sub.add_parser("fetch", help="download and verify the pinned offline assets")
    fetch.add_argument("assets", nargs="*", help=f"assets to fetch (default all: {', '.join(assets.ASSETS)})")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.set_defaults(func=cmd_fetch)

    run = sub.add_parser("run", help="next-token distribution (and generation) with and without interventions")
    _add_model_options(run)
    run.add_argument("--prompt", required=True)
    run.add_argument("--ablate", action="append", default=[], metavar="HEADS",
                     help="heads to ablate, e.g. L5H3 or 'L0H*,L1H*' (repeatable)")
    run.add_argument("--ablate-method", default="zero", choices=["zero", "mean", "uniform"])
    run.add_argument("--scale", action="append", default=[], metavar="HEADS:C=F",
                     help="scale a head's query/value/output, e.g. L10H2:v=2 (repeatable)")
    run.add_argument("--generate", type=int_in(0), default=0, metavar="N", help="also generate N tokens greedily")
    run.add_argument("--top", type=int_in(1), default=10, help="how many next tokens to show")
    run.add_argument("--json", action="store_true", help="machine-readable output")
    run.set_defaults(func=cmd_run)

    scan = sub.add_parser("scan", help="run analyses on a model and write a report (resumable)")
    _add_model_options(scan)
    scan.add_argument("--analyses", default="all", help="comma-separated analyses, or all")
    scan.add_argument("--out", required=True, help="output folder (report.html, report.md, results.json)")
    scan.add_argument("--preset", default="quick", choices=["quick", "default"],
                      help="quick: settings sized for a 2-core CPU (default); default: the full settings")
    scan.add_argument("--config", help="YAML file: {analysis: {setting: value}} overrides")
    scan.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    scan.add_argument("--force", action="store_true", help="recompute analyses that are already done")
    scan.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="run each analysis as a Ray task: on the cluster at ADDRESS (from `ray start --head`), "
                           "or a local cluster when no address is given (needs `pip install probe[cluster]`)")
    scan.add_argument("--shards", type=int_in(1, 1024), default=1, metavar="N",
                      help="with --ray: split retrieval / safety / cdt work over N actors (the result equals the serial one)")
    scan.set_defaults(func=cmd_scan)

    sweep = sub.add_parser("sweep", help="a plan of models x analyses x seeds x config variants on Ray (resumable)")
    sweep.add_argument("plan", help="plan file (YAML), e.g. configs/sweep_example.yaml")
    sweep.add_argument("--out", default=None, help="output folder (one scan folder per model/seed/variant; "
                                                   "default: the plan's `out:`)")
    sweep.add_argument("--ray", nargs="?", const="", default="", metavar="ADDRESS",
                       help="the Ray cluster (from `ray start --head`; default: a local cluster)")
    sweep.add_argument("--force", action="store_true", help="recompute jobs that are already done")
    sweep.set_defaults(func=cmd_sweep)

    organism = sub.add_parser("organism", help="build a model organism (cached): `probe organism refusal`")
    organism.add_argument("kind", choices=["refusal"])
    organism.add_argument("--force", action="store_true", help="rebuild even if cached")
    organism.add_argument("--threads", type=THREADS, default=0,
                          help=f"torch CPU threads, up to {MAX_THREADS} (default 0: automatic, re-decided while it runs from the CPU other processes use)")
    organism.set_defaults(func=cmd_organism)

    report = sub.add_parser("report", help="rebuild report.html/report.md from a scan folder (no model needed)")
    report.add_argument("dir")
    report.set_defaults(func=cmd_report)

    doc = sub.add_parser("doctor", help="check that probe reads a model right (logits, padding, ablation, analyzers)")
    doc.add_argument("model", help="model spec (embedded name, hf:<folder>, gguf:<file>; see `probe models`)")
    doc.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    doc.add_argument("--threads", type=THREADS, default=0,
                     help=f"torch CPU threads, up to {MAX_THREADS} (default 0: automatic, re-decided while it runs from the CPU other processes use)")
    doc.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    doc.set_defaults(func=cmd_doctor)

    comp = sub.add_parser("compare", help="how head scores differ between two scan folders")
    comp.add_argument("dir_a")
    comp.add_argument("dir_b")
    comp.add_argument("--top", type=int_in(1), default=10, help="how many largest changes to list")
    comp.set_defaults(func=cmd_compare)
    return parser


def _say_error(message: str) -> None:
    """One line on stderr, whatever the terminal width (no rich wrapping, no markup in the message)."""
    from rich.text import Text

    text = Text("error: ", style="bold red")
    text.append(_one_line(message, 2000))
    console.print(text, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    register_analysis_specs()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a one-line usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return int(args.func(args))
    except ProbeError as error:
        _say_error(str(error))
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - a bug, not a user mistake: one line, the traceback on request
        if os.environ.get("PROBE_TRACEBACK"):
            raise
        _say_error(f"unexpected {type(error).__name__}: {error} (a bug in probe? rerun with PROBE_TRACEBACK=1 "
                   "for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
