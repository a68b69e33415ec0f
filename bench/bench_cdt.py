"""CD-T vs path patching: circuit-discovery wall time and faithfulness, same task, prompts, machine, run.

Usage: .venv/bin/python bench/bench_cdt.py [--model smollm2-135m] [--threads 1] [--discovery 2] [--max-heads 12]
Writes bench/results/cdt.json and prints a table.
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--discovery", type=int, default=2, help="IOI prompts per template for discovery")
    parser.add_argument("--templates", default="0,1")
    parser.add_argument("--evaluation", type=int, default=10, help="IOI prompts per template for evaluation")
    parser.add_argument("--max-heads", type=int, default=12)
    parser.add_argument("--per-iteration", type=int, default=4)
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from analyses.cdt import circuits, patching, tasks
    from analyses.cdt.engine import Engine
    from analyses.common import random_head_sets
    from probe.models import load_model

    model = load_model(args.model, device="cpu")
    templates = tuple(int(t) for t in args.templates.split(","))
    discovery = tasks.ioi_batches(model, args.discovery, seed=0, templates=templates)
    evaluation = tasks.ioi_batches(model, args.evaluation, seed=1000, templates=templates)
    eval_means = [circuits.batch_means(model, b) for b in evaluation]
    disc_means = [circuits.batch_means(model, b) for b in discovery]
    L, H = model.n_layers, model.n_heads

    start = time.perf_counter()
    engine = Engine(model)
    sweep = circuits.sweep(engine, discovery)
    cdt = circuits.iterative_search(circuits.cdt_score_fn(sweep), L, H, args.per_iteration, args.max_heads, "cd-t")
    cdt_seconds = time.perf_counter() - start
    print(f"CD-T: {cdt_seconds:.1f} s, heads {[str(h) for h in cdt.heads]}", flush=True)

    start = time.perf_counter()
    pp = circuits.iterative_search(patching.path_patching_score_fn(model, discovery, disc_means), L, H,
                                   args.per_iteration, args.max_heads, "path-patching")
    pp_seconds = time.perf_counter() - start
    print(f"path patching: {pp_seconds:.1f} s, heads {[str(h) for h in pp.heads]}", flush=True)

    base = circuits.faithfulness_baselines(model, evaluation, eval_means)
    sizes = sorted({s for s in range(args.per_iteration, args.max_heads + 1, args.per_iteration)} | {args.max_heads})
    curves: dict[str, list] = {"cd-t": [], "path-patching": [], "random_mean": [], "random_all": []}
    for size in sizes:
        for name, circuit in (("cd-t", cdt), ("path-patching", pp)):
            heads = circuit.prefix(size)
            value = base.of(circuits.metric_with_circuit(model, evaluation, eval_means, heads)) if len(heads) == size else None
            curves[name].append(value)
        draws = random_head_sets(model, size, args.draws, exclude=[], seed=size)
        values = [base.of(circuits.metric_with_circuit(model, evaluation, eval_means, d)) for d in draws]
        curves["random_all"].append(values)
        curves["random_mean"].append(sum(values) / len(values))
        print(f"size {size}: cd-t {curves['cd-t'][-1]}, pp {curves['path-patching'][-1]}, "
              f"random mean {curves['random_mean'][-1]:.3f} max {max(values):.3f}", flush=True)

    accuracy = tasks.accuracy(model, evaluation)
    result = {
        "model": args.model, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "discovery_prompts": sum(b.n_prompts for b in discovery), "evaluation_prompts": accuracy["n_prompts"],
        "templates": list(templates), "max_heads": args.max_heads, "per_iteration": args.per_iteration,
        "cdt_seconds": cdt_seconds, "path_patching_seconds": pp_seconds, "speedup": pp_seconds / cdt_seconds,
        "cdt_heads": [str(h) for h in cdt.heads], "path_patching_heads": [str(h) for h in pp.heads],
        "cdt_scores": {str(h): s for h, s in cdt.scores.items()},
        "path_patching_scores": {str(h): s for h, s in pp.scores.items()},
        "overlap": len(set(cdt.heads) & set(pp.heads)),
        "full_metric": base.full, "empty_metric": base.empty, "task_accuracy": accuracy,
        "sizes": sizes, "faithfulness": curves, "random_draws": args.draws,
    }
    out = Path(__file__).parent / "results" / "cdt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n| method | discovery wall time (s) | faithfulness at {args.max_heads} heads |")
    print("|---|---|---|")
    print(f"| CD-T | {cdt_seconds:.1f} | {curves['cd-t'][-1]} |")
    print(f"| path patching | {pp_seconds:.1f} | {curves['path-patching'][-1]} |")
    print(f"| random (mean of {args.draws}) | - | {curves['random_mean'][-1]:.3f} |")
    print(f"speed-up {pp_seconds / cdt_seconds:.2f}x, threads {args.threads}; IOI accuracy {accuracy}")


if __name__ == "__main__":
    main()
