"""Write docs/BENCHMARKS.md from bench/results/*.json (each bench script writes one JSON file).

Every scalar at the top level of a result file becomes a row of a "measure | value" table; a list of
row objects (`rows`) becomes a table of its own, one line per measured case (e.g. per context length).
Files without a bench script of the same name are experiment records and are listed as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# Benchmarks

Each script in `bench/` runs a fast path against its naive reference on the same inputs, once, and
writes `bench/results/<name>.json`; `python bench/summarize.py` rebuilds this page from those files.
Timings are wall-clock seconds on the machine named in each table (thread count included); the
development machine is a 2-core CPU that was often shared with other jobs while these ran, so
compare ratios within one table rather than absolute times across tables. Where a table gives CPU
seconds beside wall seconds, the CPU seconds are the process's own (one torch thread): on the shared
machine they move much less with the other jobs' load than wall time does (the load averages, from
`uptime` / `/proc/loadavg`, are in each table). What the demo's quick scan costs, and what the
fused-attention path does for it, is read from `bench/results/quick_scan.json` in
[PERFORMANCE.md](PERFORMANCE.md).
"""

# the one command that reproduces each result file (from the repository root)
COMMANDS = {
    "floors": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_floors.py [--analyses a,b] [--repeats 3]",
    "fused": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fused.py --lengths 512 2048 --repeats 3",
    "gpu": "python bench/bench_gpu.py --kit bench/gpu_kit   # on the GPU machine; kit: bench_gpu.py --prepare bench/gpu_kit",
    "gpu_cpu_smoke": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_gpu.py --cpu-smoke",
}


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
        return ", ".join(shown(v) for v in value)
    return str(value)


def row_table(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table for a list of row objects (columns: the union of their scalar keys, in order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(shown(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def _num(value: Any, digits: int = 2) -> str:
    return "" if value is None else (f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}")


def floors_section(data: dict[str, Any]) -> list[str]:
    """Each analyzer over its floor: one line per analyzer and preset, its stages below it."""
    presets = sorted({r["preset"] for r in data.get("rows", [])})
    parts = ["Each analyzer's time over its floor, the time plain Hugging Face SDPA (no bridge, "
             "the same weights) takes to push the same tokens through the same layers. The work is counted "
             "from the analyzer's own run: every decoder-layer call (bridge, fused path, partial forwards from "
             "a layer, cached decoding steps) by its (batch, query length, key length); every layer output "
             "that takes part in a backward (Duo's gate training: reported against forward + backward of the "
             "same tokens); every layer step of CD-T's decomposition engine (its rows, sources × prompts, "
             "reported against one plain forward of as many tokens). Goal: ≤ 1.5× for analyzers whose work is "
             "forward passes. The CPU ratio is the one to read on this shared machine: the analyzer and its "
             "floor ran minutes apart under a changing load, which moves wall seconds several-fold and CPU "
             "seconds far less.",
             "",
             f"Floor: {data.get('floor', '')}. Machine: {data.get('machine', '')}, torch {data.get('torch', '')}; "
             f"{data.get('busy_machine_note', '')}. Presets measured: {', '.join(presets)}"
             + ("" if "default" in presets else
                " (the default presets are not measured here: at a load of 8-12 on 2 cores, one "
                "quick-preset pass of the six analyzers took over an hour of wall time; `--preset default "
                "--analyses NAME` measures one)") + ".", "",
             "| analyzer | preset | wall s | CPU s | floor wall s | floor CPU s | **over floor (CPU)** | over floor (wall) "
             "| layer passes (fwd / bwd / engine) | token-layers | threads | runs | load before → after | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data.get("rows", []):
        if "error" in row:
            parts.append(f"| {row['analyzer']} | {row['preset']} | error: {row['error']} |" + " |" * 11)
            continue
        passes = f"{row['layer_passes']:,} / {row['backward_layer_passes']:,} / {row['engine_layer_passes']:,}"
        tokens = row["token_layers"] + row["engine_token_layers"]
        load = f"{' '.join(row['load_average_before'])} → {' '.join(row['load_average_after'])}"
        setting = row["preset"] + (f" ({', '.join(f'{k}={v}' for k, v in row['overrides'].items())})"
                                   if row.get("overrides") else "")
        dirty = " + uncommitted " + ", ".join(row["uncommitted"]) if row.get("uncommitted") else ""
        parts.append(f"| {row['analyzer']} | {setting} | {_num(row['seconds'], 1)} | {_num(row['cpu_seconds'], 1)} "
                     f"| {_num(row['floor_s'], 1)} | {_num(row['floor_cpu_s'], 1)} | **{row['over_floor_cpu']:.2f}×** "
                     f"| {row['over_floor']:.2f}× | {passes} | {tokens:,} | {row['threads']} | best of {row['repeats']} "
                     f"| {load} | {row['commit']}{dirty} |")
        for stage, part in (row.get("stages") or {}).items():
            if part["seconds"] >= 0.5 or part["floor_s"]:
                parts.append(f"| ↳ {stage} | | {_num(part['seconds'], 1)} | {_num(part['cpu_seconds'], 1)} "
                             f"| {_num(part['floor_s'], 1)} | {_num(part['floor_cpu_s'], 1)} "
                             f"| {_ratio_text(part['over_floor_cpu'])} | {_ratio_text(part['over_floor'])} "
                             f"| {part['layer_passes']:,} / {part['backward_layer_passes']:,} / "
                             f"{part['engine_layer_passes']:,} | {part['token_layers'] + part['engine_token_layers']:,} "
                             "| | | | |")
    return parts


def _ratio_text(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, float) and value == value else ""


FUSED_COLUMNS = (("bridge_s", "bridge (eager), no hooks"), ("bridge_3_heads_s", "bridge + 3 head interventions"),
                 ("plain_sdpa_all_logits_s", "plain HF, SDPA, all logits"),
                 ("plain_sdpa_last_s", "plain HF, SDPA, last logit only"),
                 ("plain_eager_all_logits_s", "plain HF, eager"), ("fused_s", "fused, last logit"),
                 ("fused_3_heads_s", "fused + 3 head interventions"),
                 ("routed_3_heads_s", "model.logits + 3 interventions (routed)"))


def fused_section(data: dict[str, Any]) -> list[str]:
    """The fused path against the bridge and plain HF: wall seconds, and CPU seconds where recorded."""
    parts = [f"{data.get('model')}, {data.get('threads')} thread(s), best of {data.get('repeats')}, fused kernel "
             f"{data.get('fused_kernel')}, interventions: {'; '.join(data.get('interventions', []))}; commit "
             f"{data.get('commit')}, measured {data.get('measured', '')}, load {' '.join(data.get('load_average_before', []))}"
             f" → {' '.join(data.get('load_average_after', []))}.", ""]
    rows = sorted(data.get("rows", []), key=lambda r: r["tokens"])
    for label, pick in (("wall seconds", lambda r, k: r.get(k)), ("CPU seconds", lambda r, k: (r.get("cpu_s") or {}).get(k))):
        columns = [(k, name) for k, name in FUSED_COLUMNS if any(pick(r, k) is not None for r in rows)]
        if not columns:
            continue
        parts += [f"{label}:", "", "| tokens | " + " | ".join(name for _, name in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        parts += ["| " + f"{r['tokens']:,} | " + " | ".join(_num(pick(r, k)) for k, _ in columns) + " |" for r in rows]
        parts.append("")
    agreement = [k for k in ("fused_vs_bridge_last_logit_abs", "effect_rel_diff", "routed_effect_rel_diff",
                             "plain_eager_vs_sdpa_last_logit_abs", "load_average_after", "measured", "commit")
                 if any(k in r for r in rows)]
    parts += ["| tokens | " + " | ".join(agreement) + " |", "|---|" + "---|" * len(agreement)]
    parts += ["| " + f"{r['tokens']:,} | " + " | ".join(shown(r.get(k, "")) for k in agreement) + " |" for r in rows]
    routing = data.get("analyzer_routing")
    if isinstance(routing, dict):
        parts += ["", f"Analyzer stage ({routing.get('analyzer')}): bridge {routing.get('bridge_s', 0):.1f} s, routed "
                      f"{routing.get('routed_s', 0):.1f} s (best of {routing.get('repeats')}, load "
                      f"{' '.join(routing.get('load_average_before', []))}; `bench_fused.py --analyzer`)."]
    return parts


def gpu_section(data: dict[str, Any]) -> list[str]:
    """bench_gpu.py: per step, status, seconds and peak memory."""
    on_gpu = data.get("device") == "cuda"
    parts = [("GPU run: " + str(data.get("gpu_name"))) if on_gpu else
             "**Not a GPU run: `bench/bench_gpu.py` has not run on a GPU yet.** "
             "This is its CPU smoke path: " + str(data.get("shape_note")) + ".", "",
             f"Shape {data.get('shape')}, vocabulary {data.get('vocab_size'):,}, {data.get('parameters'):,} parameters, "
             f"{data.get('dtype')}, {data.get('threads')} thread(s), built in {data.get('build_s')} s; total "
             f"{data.get('total_s')} s; peak memory: {data.get('peak_memory', '')}; load "
             f"{' '.join(data.get('load_average_before', []))} → {' '.join(data.get('load_average_after', []))}; "
             f"measured {data.get('measured', '')}.", "",
             "| step | status | seconds | peak GiB | details |", "|---|---|---|---|---|"]
    if not on_gpu:
        parts[1:1] = ["", "On a GPU machine that has torch and transformers but not transformer-lens: make the kit here "
                      "(SmolLM2's tokenizer, the haystack and StrongREJECT assets, wheels of the 19 runtime packages "
                      "pinned to this checkout, about 35 MiB; `datasets`/pyarrow are left out and stubbed), carry "
                      "`bench/gpu_kit` with the working tree, and run there (sized for about 10 minutes of GPU time by estimate: it has not run on one; writes "
                      "`bench/results/gpu.json`):", "", "```",
                      ".venv/bin/python bench/bench_gpu.py --prepare bench/gpu_kit --python-version <the GPU machine's 3.X>",
                      "python bench/bench_gpu.py --kit bench/gpu_kit", "```"]
    for step in data.get("steps", []):
        details = {k: v for k, v in step.items() if k not in ("step", "status", "seconds", "peak_gib", "rows")}
        parts.append(f"| {step['step']} | {step['status']} | {_num(step.get('seconds'))} | {_num(step.get('peak_gib'))} "
                     f"| {', '.join(f'{k} {shown(v)}' for k, v in details.items())} |")
        for row in step.get("rows", []):
            parts.append(f"| ↳ {row['tokens']:,} tokens | | | | " + ", ".join(
                f"{k} {shown(v)}" for k, v in row.items() if k != "tokens") + " |")
    return parts


SPECIAL = {"floors": floors_section, "fused": fused_section, "gpu": gpu_section, "gpu_cpu_smoke": gpu_section}


def section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    stem = path.stem
    script = ROOT / "bench" / f"bench_{stem}.py"
    if stem.startswith("gpu"):
        script = ROOT / "bench" / "bench_gpu.py"
    title = f"`bench/{script.name}`" if script.exists() else "experiment record, not a bench script"
    if stem in SPECIAL:
        parts = [f"\n## {stem} ({title})\n"]
        if stem in COMMANDS:
            parts += ["```", COMMANDS[stem], "```", ""]
        return parts + SPECIAL[stem](data)
    parts = [f"\n## {path.stem} ({title})\n", "| measure | value |", "|---|---|"]
    for key, value in data.items():
        if isinstance(value, (int, float, str, bool)) or value is None or (
                isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value)):
            parts.append(f"| {key} | {shown(value)} |")
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        parts += ["", *row_table(rows)]
    return parts


RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "BENCHMARKS.md"


def render(results: Path = RESULTS) -> str:
    """The page for the result files in `results`, written nowhere: tests/docs/test_benchmarks_page.py compares it
    with the committed page, so a number on it cannot drift from its result file."""
    parts = [INTRO]
    for path in sorted(results.glob("*.json")):
        parts += section(path)
    return "\n".join(parts) + "\n"


def main() -> None:
    PAGE.write_text(render())
    print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
