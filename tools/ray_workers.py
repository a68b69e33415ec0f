"""1 vs 2 Ray workers on one 4-job plan on this machine.

    .venv/bin/python tools/ray_workers.py            # writes docs/results/ray_workers.json

The plan: tiny-llama and tiny-gqa x safety (quick preset, plain template) x seeds 0 and 1 = 4 jobs of
about equal size, 1 torch thread per task. Each worker count gets its own fresh local cluster
(`ray.init(num_cpus=N)`: N tasks at a time) in its own process. Two passes each: "cold" (worker
processes start, import torch and load the model; what a first sweep pays) and "warm" (the same jobs
again with force, worker processes and models kept). Cluster start-up is not counted. The machine's
load (`uptime`) is recorded before and after each run: on a shared machine the ratio says what
was free then, not what Ray can do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = {"models": ["tiny-llama", "tiny-gqa"], "analyses": ["safety"], "seeds": [0, 1],
        "config": {"safety": {"template": "plain"}}, "threads": 1, "device": "cpu"}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def one(workers: int) -> dict:
    """Run the plan on a fresh local cluster of `workers` CPUs; the timings as a dict."""
    import ray
    import yaml

    from analyses.cluster import read_plan, run_jobs

    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.yaml"
        plan_path.write_text(yaml.safe_dump(PLAN))
        plan = read_plan(plan_path)
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            times = {}
            for name in ("cold", "warm"):
                start = time.perf_counter()
                documents = run_jobs(plan.jobs(), Path(tmp) / "out", force=True)
                times[name] = round(time.perf_counter() - start, 2)
                errors = {f: d["errors"] for f, d in documents.items() if d["errors"]}
                if errors:
                    raise SystemExit(f"jobs failed: {errors}")
        finally:
            ray.shutdown()
    return {"workers": workers, "seconds": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)  # one measurement, in a child process
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "ray_workers.json"))
    args = parser.parse_args()
    if args.workers:
        print(json.dumps(one(args.workers)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = []
    for workers in (1, 2):
        before = load()
        child = subprocess.run([sys.executable, __file__, "--workers", str(workers)], env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        runs.append({**result, "load_before": before, "load_after": load()})
        print(runs[-1], flush=True)
    one_w, two_w = runs
    document = {
        "what": "wall seconds of analyses.cluster.run_jobs for a 4-job plan (2 tiny models x safety x 2 seeds), "
                "1 vs 2 Ray workers (local cluster num_cpus=N), 1 torch thread per task",
        "command": "python tools/ray_workers.py",
        "plan": PLAN,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "ray": __import__("ray").__version__},
        "threads_per_task": 1,
        "load": "os.getloadavg() (1, 5, 15 min) before/after each run; the machine is shared with other jobs",
        "runs": runs,
        "ratio_1_over_2": {k: round(one_w["seconds"][k] / two_w["seconds"][k], 2) for k in ("cold", "warm")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(f"ratio 1/2 workers: {document['ratio_1_over_2']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
