"""The bridge (eager attention) vs the fused path (probe/fused.py: the HF attention modules on SDPA, head
interventions at the output projection's input) vs plain HF SDPA.

SmolLM2-135M (the embedded GGUF, loaded with probe.models.load_model), one sequence of random token ids
per length, one torch thread, best of `--repeats` per cell:

- bridge, no hooks / + 3 head interventions: `model.logits(ids)` with the routing off
  (`model.fused_routing = False`: every position, as the bridge computes them), the interventions through
  `probe.interventions.intervene`;
- routed + 3 head interventions: `model.logits(ids, positions="last")` inside the same `intervene()` block
  with the routing on (what analyzers get: LoadedModel hands the block to the fused path);
- fused, no hooks / + 3 head interventions: `probe.fused.fused_logits(..., positions="last")`, and the
  clean fused forward with every position's logits;
- plain HF SDPA, last logit: an independent HF copy of the same GGUF (`attn_implementation="sdpa"`,
  `logits_to_keep=1`): the floor; the same copy with every position's logits, and a third copy on HF's
  eager attention with every position's logits (what eager attention costs without the bridge).

Each cell records wall seconds and, under `cpu_s`, the process's CPU seconds (best of the repeats each):
the development machine is shared, and CPU time of one thread moves less with the other jobs' load.

The 3 interventions: zero ablation of L5H3, value x0.5 on L12H1, output x2 on L20H4 (head outputs only:
what the fused path serves). Each row also records the fused path's agreement with the bridge at that
length (last-position logits, and the interventions' effect relative to its size). The load average is
recorded before and after: numbers from a busy machine are slower than idle ones.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fused.py            # 512 and 2048 tokens, best of 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fused.py --analyzer  # factual's QUICK sweep, bridge vs routed

`--analyzer` times one analyzer stage: factual's scaling search at its QUICK preset
(`analyses.factual.scale_sweep`: first-token forwards of the tuning prompts inside `intervene()`, 2 heads x
11 factors, through `model.logits`) with the routing off (`PROBE_FUSED=0`) and on, best of `--repeats`
(2 by default there), and stores it under "analyzer_routing" in the same file, with the largest
difference between the two runs' numbers. (The whole `factual.run(QUICK)` takes ~10 min a run on the busy
2-core machine: too long to repeat four times here.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "fused.json"
SPEC = "smollm2-135m"


def _loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return ""


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def best_of_both(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(best wall seconds, best CPU seconds of this process, the last output): CPU time is what one
    thread spends, less sensitive than wall time to other jobs on a shared machine."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, out


def plain_sdpa_copy(implementation: str = "sdpa") -> Any:
    """An HF copy of the same GGUF, never bridged, on SDPA (or `implementation`, e.g. "eager")."""
    from transformers import AutoModelForCausalLM

    from probe import assets
    from probe.models import SPECS, _quiet

    spec = SPECS[SPEC]
    path = assets.asset_file(spec.asset)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=spec.gguf_file,
                                                     dtype=torch.float32, attn_implementation=implementation)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def bridge_only(model: Any) -> Iterator[None]:
    before, model.fused_routing = model.fused_routing, False
    try:
        yield
    finally:
        model.fused_routing = before


def _numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Every float/int leaf of a (dataclass) result, by path: to compare two runs."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}{i}.").items()}
    if isinstance(value, bool):
        return {prefix[:-1]: float(value)}
    if isinstance(value, (int, float)):
        return {prefix[:-1]: float(value)}
    return {}


def analyzer_routing(repeats: int, out: Path) -> None:
    """factual's QUICK scaling search on SmolLM2 (`scale_sweep` over the QUICK tuning prompts, 2 heads x the
    QUICK factors, value scaling: first-token forwards inside `intervene()`), with PROBE_FUSED=0 (bridge)
    and with the routing on; best of repeats. The prompts are built once, the analyzer's own way."""
    from analyses import factual
    from probe.heads import Head
    from probe.models import FUSED_ENV, load_model

    load_before = _loadavg()
    model = load_model(SPEC, device="cpu")
    config = factual.QUICK
    pool = factual.prompts._pool(config)
    usable, _ = factual.behaviour._known_countries(model, pool, config, None)
    tuning_countries, _ = factual.split_countries(usable, config.tuning_fraction, config.seed)
    prompts = factual.build_counterfactuals(model.tokenizer, tuning_countries, config.n_tuning, config.seed,
                                            config.template, None, context_pool=pool).prompts
    heads = [Head(5, 3), Head(12, 1)]
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    for label, env in (("bridge", "0"), ("routed", "1")):
        os.environ[FUSED_ENV] = env
        timings[f"{label}_s"], results[label] = best_of(
            lambda: factual.scale_sweep(model, prompts, heads, config.factors, config.component, config.batch_size),
            repeats)
        print(f"factual QUICK scaling search, {label}: {timings[f'{label}_s']:.1f} s", flush=True)
    os.environ.pop(FUSED_ENV, None)
    a, b = _numbers(results["bridge"]), _numbers(results["routed"])
    shared = [k for k in a if k in b and a[k] == a[k] and b[k] == b[k]]  # NaN-free keys of both
    worst = max(shared, key=lambda k: abs(a[k] - b[k]), default=None)
    entry = {"analyzer": "analyses.factual.scale_sweep at QUICK (tuning prompts, 2 heads x 11 factors, value)",
             "model": SPEC, "n_prompts": len(prompts), "heads": [str(h) for h in heads], "repeats": repeats,
             "threads": torch.get_num_threads(), **timings, "bridge_over_routed": timings["bridge_s"] / timings["routed_s"],
             "numbers_compared": len(shared), "numbers_differing": sum(a[k] != b[k] for k in shared),
             "largest_difference": None if worst is None else {"number": worst, "bridge": a[worst], "routed": b[worst]},
             "commit": _commit(), "load_average_before": load_before, "load_average_after": _loadavg()}
    print(json.dumps(entry), flush=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data["analyzer_routing"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--analyzer", action="store_true", help="time factual's QUICK scaling search, bridge vs routed")
    parser.add_argument("--merge-from", type=Path, metavar="FILE",
                        help="merge the rows of FILE (another run of this script, e.g. one length measured in "
                             "parallel) into --out by length, then stop")
    args = parser.parse_args()
    if args.merge_from is not None:
        other = json.loads(args.merge_from.read_text())
        data = json.loads(args.out.read_text()) if args.out.is_file() else {k: v for k, v in other.items() if k != "rows"}
        lengths = {row["tokens"] for row in other["rows"]}
        data["rows"] = sorted([r for r in data.get("rows", []) if r["tokens"] not in lengths] + other["rows"],
                              key=lambda r: r["tokens"])
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"merged {sorted(lengths)} from {args.merge_from} into {args.out}")
        return
    torch.set_num_threads(args.threads)
    if args.analyzer:
        analyzer_routing(args.repeats if args.repeats != 3 else 2, args.out)
        return

    from probe.fused import fused_logits, implementation
    from probe.heads import Head
    from probe.interventions import intervene, scale, zero_ablation
    from probe.models import load_model

    load_before = _loadavg()
    started = time.perf_counter()
    model = load_model(SPEC, device="cpu")
    plain = plain_sdpa_copy()
    plain_eager = plain_sdpa_copy("eager")
    interventions = [zero_ablation([Head(5, 3)]), scale([Head(12, 1)], "value", 0.5),
                     scale([Head(20, 4)], "output", 2.0)]
    print(f"loaded in {time.perf_counter() - started:.0f} s; fused kernel: {implementation(model)}; "
          f"load average {' '.join(load_before)}", flush=True)

    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in args.lengths:
        ids = torch.randint(0, model.d_vocab, (1, n), generator=generator)

        def bridge() -> torch.Tensor:
            with torch.no_grad(), bridge_only(model):
                return model.logits(ids)

        def bridge_hooked() -> torch.Tensor:
            with torch.no_grad(), intervene(model, interventions), bridge_only(model):
                return model.logits(ids)

        def routed_hooked() -> torch.Tensor:
            with torch.no_grad(), intervene(model, interventions):
                return model.logits(ids, positions="last")

        def plain_last() -> torch.Tensor:
            with torch.no_grad():
                return plain(ids, logits_to_keep=1).logits

        def plain_all() -> torch.Tensor:
            with torch.no_grad():
                return plain(ids).logits

        def eager_all() -> torch.Tensor:
            with torch.no_grad():
                return plain_eager(ids).logits

        cells: dict[str, Callable[[], torch.Tensor]] = {
            "bridge_s": bridge,
            "bridge_3_heads_s": bridge_hooked,
            "fused_s": lambda: fused_logits(model, ids, positions="last"),
            "fused_3_heads_s": lambda: fused_logits(model, ids, interventions, positions="last"),
            "routed_3_heads_s": routed_hooked,
            "fused_all_logits_s": lambda: fused_logits(model, ids),
            "plain_sdpa_last_s": plain_last,
            "plain_sdpa_all_logits_s": plain_all,
            "plain_eager_all_logits_s": eager_all,
        }
        row: dict[str, Any] = {"tokens": n}
        cpu: dict[str, float] = {}
        outputs: dict[str, torch.Tensor] = {}
        for key, fn in cells.items():
            row[key], cpu[key], out = best_of_both(fn, args.repeats)
            outputs[key] = out[:, -1].float()
            print(f"{n:6d} tokens  {key:24s} {row[key]:7.2f} s wall {cpu[key]:7.2f} s CPU  load "
                  f"{' '.join(_loadavg())}", flush=True)
        row["cpu_s"] = {key: round(value, 3) for key, value in cpu.items()}
        effect = outputs["bridge_3_heads_s"] - outputs["bridge_s"]
        ours = outputs["fused_3_heads_s"] - outputs["fused_s"]
        row["fused_vs_bridge_last_logit_abs"] = float((outputs["fused_s"] - outputs["bridge_s"]).abs().max())
        row["fused_vs_plain_last_logit_abs"] = float((outputs["fused_s"] - outputs["plain_sdpa_last_s"]).abs().max())
        row["effect_max_abs"] = float(effect.abs().max())
        row["effect_rel_diff"] = float((ours - effect).abs().max() / effect.abs().max())
        routed = outputs["routed_3_heads_s"] - outputs["fused_s"]
        row["routed_effect_rel_diff"] = float((routed - effect).abs().max() / effect.abs().max())
        row["bridge_over_fused"] = row["bridge_s"] / row["fused_s"]
        row["bridge_3_heads_over_fused_3_heads"] = row["bridge_3_heads_s"] / row["fused_3_heads_s"]
        row["fused_over_plain"] = row["fused_s"] / row["plain_sdpa_last_s"]
        row["fused_3_heads_over_plain"] = row["fused_3_heads_s"] / row["plain_sdpa_last_s"]
        row["bridge_3_heads_over_routed_3_heads"] = row["bridge_3_heads_s"] / row["routed_3_heads_s"]
        row["plain_eager_vs_sdpa_last_logit_abs"] = float(
            (outputs["plain_eager_all_logits_s"] - outputs["plain_sdpa_all_logits_s"]).abs().max())
        row["fused_3_heads_over_plain_cpu"] = cpu["fused_3_heads_s"] / cpu["plain_sdpa_last_s"]
        row["bridge_over_fused_cpu"] = cpu["bridge_s"] / cpu["fused_s"]
        row["load_average_after"] = _loadavg()
        row["commit"], row["measured"] = _commit(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_rows(args, rows, model, interventions, load_before)  # after each length: a slow run keeps what it measured


def write_rows(args: argparse.Namespace, rows: list[dict[str, Any]], model: Any, interventions: list[Any],
               load_before: list[str]) -> None:
    from probe.fused import implementation

    result = {
        "bench": "issue 19's table: bridge (eager) vs fused path (HF attention on SDPA) vs plain HF SDPA, "
                 "one sequence of random tokens, best of repeats",
        "model": SPEC, "threads": args.threads, "repeats": args.repeats, "fused_kernel": implementation(model),
        "interventions": [i.describe() for i in interventions],
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "commit": _commit(),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": load_before, "load_average_after": _loadavg(),
        "busy_machine_note": "other agents ran on the same 2 cores during this run when the load average "
                             "is above ~2: wall seconds are slower than idle; cpu_s (this process's CPU time) "
                             "moves less with the load",
        "rows": rows,
    }
    if args.out.is_file():  # keep the --analyzer entry, and the rows of lengths this run did not measure
        before = json.loads(args.out.read_text())
        if before.get("analyzer_routing") is not None:
            result["analyzer_routing"] = before["analyzer_routing"]
        measured = {row["tokens"] for row in rows}
        result["rows"] = sorted([r for r in before.get("rows", []) if r["tokens"] not in measured] + rows,
                                key=lambda r: r["tokens"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
