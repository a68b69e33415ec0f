"""Peak memory of each analyzer's quick preset, each in its own process (the demo scan's work).

Usage: python bench/bench_memory.py [--model smollm2-135m] [--threads 1] [--analyses all] [--preset quick]

For every analysis a fresh child process loads the model, records its resident set after the load,
runs the analyzer's preset (never from a cache) and reports its peak resident set (`ru_maxrss`).
A scan runs them one after the other in one process and trims the heap between them, so its peak
is close to the largest of these (the scan's own peak is measured with `/usr/bin/time -v probe scan
...`, see README). Writes bench/results/memory.json; `--analyses a,b` re-measures those rows only
(each row names the commit it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    """Current resident set of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(model_spec: str, analysis: str, preset: str, threads: int) -> None:
    """Run one analysis in this process and print one JSON line with its memory and time."""
    import torch

    torch.set_num_threads(threads)
    from analyses.registry import ANALYZERS, make_config
    from probe.models import load_model

    model = load_model(model_spec, device="cpu")
    after_load = _rss_mib()
    entry = ANALYZERS[analysis]
    config = make_config(entry, preset, None, 0)
    start = time.perf_counter()
    entry.load().run(model, config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"analysis": analysis, "rss_after_load_mib": round(after_load, 1),
                      "peak_rss_mib": round(peak, 1), "run_s": round(seconds, 1)}))


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--analyses", default="all")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.preset, args.threads)
        return

    from analyses.registry import ANALYZERS

    names = list(ANALYZERS) if args.analyses == "all" else args.analyses.split(",")
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--model", args.model, "--preset", args.preset,
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["commit"] = _commit()
        row["measured"] = time.strftime("%Y-%m-%d %H:%M")
        print(f"{name:>10}: peak {row['peak_rss_mib']:8.1f} MiB (after load {row['rss_after_load_mib']:.1f}), "
              f"{row['run_s']:.1f} s", flush=True)
        rows.append(row)
    out = Path(args.out)
    kept = []
    if out.exists() and args.analyses != "all":  # a partial run replaces only its own rows
        previous = json.loads(out.read_text())
        if (previous.get("model"), previous.get("preset")) == (args.model, args.preset):
            kept = [r for r in previous.get("rows", []) if r["analysis"] not in names]
    rows = sorted(kept + rows, key=lambda r: list(ANALYZERS).index(r["analysis"]))
    result = {"model": args.model, "preset": args.preset, "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "largest_peak_rss_mib": max(r["peak_rss_mib"] for r in rows), "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
