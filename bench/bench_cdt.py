"""CD-T vs path patching: circuit-discovery wall time and faithfulness, same task, prompts, machine, run.

Usage: .venv/bin/python bench/bench_cdt.py [--model smollm2-135m] [--threads 1] [--discovery 2] [--max-heads 12]
Writes bench/results/cdt.json and prints a table. Records torch threads and os.getloadavg() around
each timed phase (the machine is shared: load averages say how contended the timings are).

- CD-T: the fast β-only sweep (every head a source, one pass per source layer) + the iterative
  search with Alg. 1's greedy pruning/refill on the discovery prompts (batched metric calls).
- path patching (the baseline, `analyses/cdt/patching.py`): the same iterative search, scores from
  path patching; each forward holds (sender, prompt) rows of one template, ≤ 256 rows.
- engine check: one source layer (0) with the two-stream reference sweep vs the fast sweep.
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


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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
    parser.add_argument("--target-mode", default="weighted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from analyses.cdt import circuits, fast, patching, tasks
    from analyses.cdt.engine import Engine
    from analyses.common import random_head_sets
    from probe.models import load_model

    model = load_model(args.model, device="cpu")
    templates = tuple(int(t) for t in args.templates.split(","))
    discovery = tasks.ioi_batches(model, args.discovery, seed=0, templates=templates)
    evaluation = tasks.ioi_batches(model, args.evaluation, seed=1000, templates=templates)
    eval_means = [circuits.batch_means(model, b) for b in evaluation]
    L, H = model.n_layers, model.n_heads
    loads: dict[str, list[float]] = {"start": load()}

    engine = Engine(model)
    start = time.perf_counter()
    circuits.sweep(engine, discovery, source_layers=[0])
    reference_layer0 = time.perf_counter() - start
    start = time.perf_counter()
    fast.fast_sweep(engine, discovery, source_layers=[0])
    fast_layer0 = time.perf_counter() - start
    print(f"source layer 0: two-stream reference sweep {reference_layer0:.1f} s, fast sweep {fast_layer0:.1f} s",
          flush=True)

    loads["cdt_before"] = load()
    start = time.perf_counter()
    sweep = fast.fast_sweep(engine, discovery)
    sweep_seconds = time.perf_counter() - start
    score_fn = circuits.cdt_score_fn(sweep, args.target_mode)
    cdt = circuits.iterative_search(score_fn, L, H, args.per_iteration, args.max_heads, "cd-t", 0.0,
                                    circuits.discovery_metric(model, discovery, sweep.z_means))
    cdt_seconds = time.perf_counter() - start
    loads["cdt_after"] = load()
    cdt_plain = circuits.iterative_search(score_fn, L, H, args.per_iteration, args.max_heads, "cd-t (no pruning)")
    print(f"CD-T: {cdt_seconds:.1f} s (sweep {sweep_seconds:.1f} s), heads {[str(h) for h in cdt.heads]}, "
          f"load {loads['cdt_after']}", flush=True)

    loads["pp_before"] = load()
    start = time.perf_counter()
    pp = circuits.iterative_search(patching.path_patching_score_fn(model, discovery), L, H,
                                   args.per_iteration, args.max_heads, "path-patching")
    pp_seconds = time.perf_counter() - start
    loads["pp_after"] = load()
    print(f"path patching: {pp_seconds:.1f} s, heads {[str(h) for h in pp.heads]}, load {loads['pp_after']}",
          flush=True)

    base = circuits.faithfulness_baselines(model, evaluation, eval_means)
    sizes = sorted({*range(args.per_iteration, args.max_heads + 1, args.per_iteration), args.max_heads})
    methods = {"cd-t": cdt, "cd-t (no pruning)": cdt_plain, "path-patching": pp}
    curves: dict[str, list] = {name: [] for name in methods} | {"random_mean": [], "random_max": [], "random_all": []}
    for size in sizes:
        wanted = [m.prefix(size) for m in methods.values()]
        draws = random_head_sets(model, size, args.draws, exclude=cdt.prefix(size), seed=size)
        values = [base.of(v) for v in circuits.metrics_with_circuits(model, evaluation, eval_means, wanted + draws)]
        for (name, found), value in zip(methods.items(), values):
            curves[name].append(value if len(found.prefix(size)) == size else None)
        randoms = values[len(methods):]
        curves["random_all"].append(randoms)
        curves["random_mean"].append(sum(randoms) / len(randoms))
        curves["random_max"].append(max(randoms))
        print(f"size {size}: " + ", ".join(f"{n} {curves[n][-1]}" for n in methods)
              + f", random mean {curves['random_mean'][-1]:.3f} max {max(randoms):.3f}", flush=True)

    accuracy = tasks.accuracy(model, evaluation)
    loads["end"] = load()
    result = {
        "model": args.model, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average_1_5_15min": loads,
        "discovery_prompts": sum(b.n_prompts for b in discovery), "evaluation_prompts": accuracy["n_prompts"],
        "templates": list(templates), "max_heads": args.max_heads, "per_iteration": args.per_iteration,
        "target_mode": args.target_mode,
        "engine_layer0_seconds": {"two_stream_reference": reference_layer0, "fast": fast_layer0},
        "cdt_sweep_seconds": sweep_seconds, "cdt_seconds": cdt_seconds, "path_patching_seconds": pp_seconds,
        "speedup": pp_seconds / cdt_seconds,
        "cdt_heads": [str(h) for h in cdt.heads], "cdt_iterations": [[str(h) for h in it] for it in cdt.iterations],
        "cdt_no_pruning_heads": [str(h) for h in cdt_plain.heads],
        "path_patching_heads": [str(h) for h in pp.heads],
        "cdt_scores": {str(h): s for h, s in cdt.scores.items()},
        "path_patching_scores": {str(h): s for h, s in pp.scores.items()},
        "overlap": len(set(cdt.heads) & set(pp.heads)),
        "full_metric": base.full, "empty_metric": base.empty, "task_accuracy": accuracy,
        "sizes": sizes, "faithfulness": curves, "random_draws": args.draws,
    }
    out = Path(__file__).parent / "results" / "cdt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n| method | discovery wall time (s) | faithfulness at {', '.join(map(str, sizes))} heads |")
    print("|---|---|---|")
    fmt = lambda xs: " / ".join("n/a" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"| CD-T (sweep + pruned search) | {cdt_seconds:.1f} | {fmt(curves['cd-t'])} |")
    print(f"| CD-T without pruning | {sweep_seconds:.1f} | {fmt(curves['cd-t (no pruning)'])} |")
    print(f"| path patching | {pp_seconds:.1f} | {fmt(curves['path-patching'])} |")
    print(f"| random (mean of {args.draws}) | - | {fmt(curves['random_mean'])} |")
    print(f"speed-up {pp_seconds / cdt_seconds:.2f}x, torch threads {args.threads}, load averages {loads}; "
          f"IOI accuracy {accuracy}")


if __name__ == "__main__":
    main()
