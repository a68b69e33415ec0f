"""The README's main job on the embedded default model: load it and show head interventions.

Writes `<out>/demo.md` and `<out>/demo.json`. (It grows into a full `probe scan` as analyzers land.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from probe.effects import intervention_effects
from probe.errors import ProbeError
from probe.heads import parse_heads
from probe.interventions import ablation, head_means, mean_source_prompts, scale
from probe.models import DEFAULT_MODEL, facts, load_model

PROMPT = "The capital of France is"


def run_demo(spec: str, out: Path) -> dict:
    start = time.perf_counter()
    model = load_model(spec, progress=lambda m: print(m, file=sys.stderr))
    load_s = time.perf_counter() - start
    early = parse_heads("L0H*,L1H*,L2H*", model)
    means = head_means(model, mean_source_prompts(model), early)
    setups = {
        "zero-ablate all heads of layers 0-2": [ablation(early, "zero")],
        "mean-ablate all heads of layers 0-2": [ablation(early, "mean", means)],
        "uniform attention in all heads of layers 0-2": [ablation(early, "uniform")],
        "scale output of L0H* by -1": [scale(parse_heads("L0H*", model), "output", -1.0)],
    }
    runs = {}
    for label, interventions in setups.items():
        print(f"running: {label}", file=sys.stderr)
        runs[label] = intervention_effects(model, PROMPT, interventions, top_k=5, generate=8).to_json()
    report = {"model": facts(model), "load_seconds": round(load_s, 1), "prompt": PROMPT, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    lines = [f"# probe demo: {spec}", "", f"Prompt: `{PROMPT}`", ""]
    for label, run in runs.items():
        a, b = run["original"]["top"][0], run["intervened"]["top"][0]
        lines += [f"## {label}", "",
                  f"- original top token {a['token']!r} p={a['prob']:.3f}; generation {run['original']['generation']!r}",
                  f"- intervened top token {b['token']!r} p={b['prob']:.3f}; generation {run['intervened']['generation']!r}",
                  f"- total variation {run['total_variation']:.3f}, KL {run['kl']:.3f} nats", ""]
    (out / "demo.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"report written to {out / 'demo.md'} and {out / 'demo.json'}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("reports/demo"))
    args = parser.parse_args(argv)
    try:
        run_demo(args.model, args.out)
    except ProbeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
