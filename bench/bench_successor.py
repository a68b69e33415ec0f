"""Successor scores of every head: batched fast path vs the naive per-head/per-token reference loop.

Usage: python bench/bench_successor.py [--model smollm2-135m] [--threads 1] [--reference-heads N]

Both paths score the same task tokens with the same conventions; the script checks that the scores
agree, prints a table and writes bench/results/successor.json (timings, ratio, threads, machine).
`--reference-heads N` runs the reference on the first N heads only and extrapolates its time
linearly (the loop is exactly linear in heads); the JSON records that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-heads", type=int, default=0, help="0 = all heads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from analyses import successor
    from analyses.data.succession import build_tasks
    from probe.models import load_model

    model = load_model(args.model, device="cpu")
    config = successor.SuccessorConfig(run_probe=False, run_arithmetic=False, run_causal=False)

    successor.run(model, config)  # warm-up (first calls allocate)
    start = time.perf_counter()
    fast = successor.run(model, config).scores
    fast_s = time.perf_counter() - start

    task_set = build_tasks(model.tokenizer, config.number_max)
    heads = model.all_heads()
    if args.reference_heads:
        heads = heads[: args.reference_heads]
    start = time.perf_counter()
    slow = successor.reference_scores(model, task_set, config, heads)
    reference_measured_s = time.perf_counter() - start
    reference_s = reference_measured_s * model.n_layers * model.n_heads / len(heads)
    max_diff = max(abs(fast[h] - s) for h, s in slow.items())

    n_tokens = sum(t.n_scored for t in task_set.tasks)
    row = {
        "model": args.model, "heads": model.n_layers * model.n_heads, "scored_tokens": n_tokens,
        "fast_s": round(fast_s, 3), "reference_s": round(reference_s, 2),
        "reference_heads_run": len(heads), "reference_extrapolated": len(heads) < model.n_layers * model.n_heads,
        "speedup": round(reference_s / fast_s, 1), "max_abs_score_difference": max_diff,
        "fast_under_10_s": fast_s < 10.0, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
    }
    print(f"{'model':14s} {'heads':>5s} {'tokens':>6s} {'fast s':>8s} {'reference s':>12s} {'speedup':>8s} "
          f"{'max |diff|':>10s} threads")
    print(f"{row['model']:14s} {row['heads']:5d} {n_tokens:6d} {fast_s:8.3f} {reference_s:12.2f} "
          f"{row['speedup']:8.1f} {max_diff:10.2e} {row['threads']}"
          + ("  (reference extrapolated from %d heads)" % len(heads) if row["reference_extrapolated"] else ""))
    out = Path(__file__).parent / "results" / "successor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
