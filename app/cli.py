"""The `probe` command line: models, fetch, run (and, as analyzers land, scan/report).

Every user mistake surfaces as a `ProbeError` and is printed as one clear message (exit code 2),
never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

import analyses.organism  # noqa: F401  (registers the smollm2-135m-refusal model spec)
from probe import assets
from probe.errors import InterventionError, ProbeError
from probe.heads import parse_heads
from probe.interventions import Intervention, ablation, head_means, reference_prompts, scale
from probe.models import DEFAULT_MODEL, LoadedModel, load_model, spec_summary
from probe.runtime import set_threads

console = Console(stderr=True)
_SCALE = re.compile(r"^(?P<heads>[^:]+):(?P<what>q|query|v|value|o|output)=(?P<factor>-?[0-9.eE+-]+)$")
_COMPONENT = {"q": "query", "v": "value", "o": "output"}


def parse_scale(text: str, model: LoadedModel) -> Intervention:
    """`L10H2:v=2`, `5.3:q=0.5`, `L3H*:output=-1` → a scaling intervention."""
    match = _SCALE.match(text.strip())
    if not match:
        raise InterventionError(f"Cannot read --scale {text!r}: write HEADS:q|v|o=FACTOR, e.g. L10H2:v=2.")
    component = _COMPONENT.get(match["what"], match["what"])
    return scale(parse_heads(match["heads"].replace("+", ","), model), component, float(match["factor"]))


def build_interventions(model: LoadedModel, ablate: Sequence[str], method: str,
                        scales: Sequence[str]) -> list[Intervention]:
    interventions: list[Intervention] = []
    if ablate:
        heads = parse_heads(",".join(ablate), model)
        means = head_means(model, reference_prompts(model), heads) if method == "mean" else None
        interventions.append(ablation(heads, method, means))
    interventions.extend(parse_scale(text, model) for text in scales)
    return interventions


def _load(args: argparse.Namespace) -> LoadedModel:
    threads = set_threads(getattr(args, "threads", 0))
    start = time.perf_counter()
    with console.status(f"Loading {args.model} ...") as status:
        model = load_model(args.model, device=args.device, dtype=args.dtype,
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
    from probe.compare import compare

    model = _load(args)
    interventions = build_interventions(model, args.ablate, args.ablate_method, args.scale)
    with console.status("Running original and intervened passes ..."):
        result = compare(model, args.prompt, interventions, top_k=args.top, generate=args.generate)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
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
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ProbeError(f"Cannot read config {path}: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ProbeError(f"{path} must map analysis names to settings, e.g. `retrieval: {{lengths: [512, 1024]}}`.")
    return data


def cmd_scan(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from analyses.registry import resolve
    from analyses.report import write_reports
    from analyses.scan import ScanSettings, run_scan, scan_lock

    entries = resolve(args.analyses)
    if not entries:
        raise ProbeError("No analysis to run.")
    settings = ScanSettings(analyses=[e.name for e in entries], preset=args.preset, seed=args.seed,
                            overrides=_read_overrides(args.config), force=args.force,
                            command="probe " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    model = _load(args)
    out = Path(args.out)
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
    return 1 if any(entry.name in document["errors"] for entry in entries) else 0  # this scan's failures


def cmd_report(args: argparse.Namespace) -> int:
    from analyses.report import write_reports

    html_path, md_path = write_reports(args.dir)
    console.print(f"report: {html_path}\n        {md_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analyses.report import compare_documents, load_document

    print(compare_documents(load_document(args.dir_a), load_document(args.dir_b), top=args.top))
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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `probe models`)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16, float16")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: all cores if the machine is idle, else 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="Find and intervene on attention heads.")
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
    run.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens greedily")
    run.add_argument("--top", type=int, default=10, help="how many next tokens to show")
    run.add_argument("--json", action="store_true", help="machine-readable output")
    run.set_defaults(func=cmd_run)

    scan = sub.add_parser("scan", help="run analyses on a model and write a report (resumable)")
    _add_model_options(scan)
    scan.add_argument("--analyses", default="all", help="comma-separated analyses, or all")
    scan.add_argument("--out", required=True, help="output folder (report.html, report.md, results.json)")
    scan.add_argument("--preset", default="quick", choices=["quick", "default"],
                      help="quick: settings sized for a 2-core CPU (default); default: the full settings")
    scan.add_argument("--config", help="YAML file: {analysis: {setting: value}} overrides")
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--force", action="store_true", help="recompute analyses that are already done")
    scan.set_defaults(func=cmd_scan)

    organism = sub.add_parser("organism", help="build a model organism (cached): `probe organism refusal`")
    organism.add_argument("kind", choices=["refusal"])
    organism.add_argument("--force", action="store_true", help="rebuild even if cached")
    organism.add_argument("--threads", type=int, default=0,
                          help="torch CPU threads (default: all cores if the machine is idle, else 1)")
    organism.set_defaults(func=cmd_organism)

    report = sub.add_parser("report", help="rebuild report.html/report.md from a scan folder (no model needed)")
    report.add_argument("dir")
    report.set_defaults(func=cmd_report)

    comp = sub.add_parser("compare", help="how head scores differ between two scan folders")
    comp.add_argument("dir_a")
    comp.add_argument("dir_b")
    comp.add_argument("--top", type=int, default=10)
    comp.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ProbeError as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
