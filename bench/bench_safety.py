"""Ships for all heads: batched fast path vs the paper's one-head-at-a-time loop, same prompts.

Run: .venv/bin/python bench/bench_safety.py [--model smollm2-135m] [--prompts 1] [--threads 1]
Writes bench/results/safety.json and prints a table. Scores must be identical (max abs diff shown).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from analyses import safety as S
from analyses.data.strongreject import harmful_split
from analyses.safety.readouts import ABLATIONS
from analyses.safety.ships import ships_screened
from probe.models import load_model
from probe.results import HeadScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ablation", default="query", choices=sorted(ABLATIONS))
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--rescore", type=int, default=40, help="heads the first-order screen rescores exactly")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    train, _ = harmful_split()
    prompts = S.encode_prompts(model, train[: args.prompts])
    rows = []
    for ids in prompts:
        started = time.perf_counter()
        fast = S.ships_query(model, ids, args.ablation, 1e-5, batch_rows=args.batch_rows)
        fast_s = time.perf_counter() - started
        started = time.perf_counter()
        loop = S.ships_query_reference(model, ids, args.ablation, 1e-5)
        loop_s = time.perf_counter() - started
        started = time.perf_counter()
        estimate, rescored = ships_screened(model, ids, args.ablation, 1e-5, rescore=args.rescore,
                                            batch_rows=args.batch_rows)
        screen_s = time.perf_counter() - started
        exact_top = {str(h) for h, _ in HeadScores("l", "nats", loop).top(10)}
        screened_top = {str(h) for h, _ in HeadScores("s", "nats", rescored).top(10)}
        estimate_top = {str(h) for h, _ in HeadScores("e", "nats", estimate).top(10)}
        diff = float((fast - loop).abs().max())
        rel = float(((fast - loop).abs() / loop.abs().clamp_min(1e-6)).max())
        same_top = [str(h) for h, _ in HeadScores("f", "nats", fast).top(10)] == \
                   [str(h) for h, _ in HeadScores("l", "nats", loop).top(10)]
        rows.append({"tokens": int(ids.shape[-1]), "heads": model.n_layers * model.n_heads, "batched_s": fast_s,
                     "loop_s": loop_s, "speedup": loop_s / fast_s, "max_abs_diff": diff, "max_rel_diff": rel,
                     "same_top10": same_top, "max_score": float(loop.max()),
                     "screen_rescore": args.rescore, "screen_s": screen_s, "screen_speedup": loop_s / screen_s,
                     "screen_top10_overlap": len(exact_top & screened_top),
                     "estimate_top10_overlap": len(exact_top & estimate_top),
                     "screen_top1_same": HeadScores("s", "nats", rescored).top(1)[0][0]
                     == HeadScores("l", "nats", loop).top(1)[0][0]})
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    out = {"bench": "safety: all-heads Ships, batched (rows + start at the ablated layer) vs per-head loop; "
                    "first-order screen + exact rescoring of its top heads",
           "model": args.model, "ablation": args.ablation, "threads": args.threads, "batch_rows": args.batch_rows,
           "machine": platform.processor() or platform.machine(), "cpu_count": torch.get_num_threads(),
           "load_average": load, "rows": rows}
    path = Path(__file__).parent / "results" / "safety.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"{'tokens':>6} {'heads':>5} {'batched s':>9} {'loop s':>8} {'speedup':>7} {'max|diff|':>10} top10 "
          f"{'screen s':>8} {'x':>5} overlap")
    for r in rows:
        print(f"{r['tokens']:6d} {r['heads']:5d} {r['batched_s']:9.1f} {r['loop_s']:8.1f} {r['speedup']:7.1f} "
              f"{r['max_abs_diff']:10.2e} {r['same_top10']} {r['screen_s']:8.1f} {r['screen_speedup']:5.1f} "
              f"{r['screen_top10_overlap']}/10")
    print(f"threads={args.threads} load={load} -> {path}")


if __name__ == "__main__":
    main()
