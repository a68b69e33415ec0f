"""bf16 vs fp32, and disk-offloaded vs one device, for every analyzer on its planted tiny model.

    OMP_NUM_THREADS=1 .venv/bin/python -m tools.scale_agreement            # both files
    OMP_NUM_THREADS=1 .venv/bin/python -m tools.scale_agreement --only retrieval,duo --no-write
    .venv/bin/python -m tools.scale_agreement --table                      # docs/SCALE.md's tables

Each analyzer runs end to end (its `run`, settings sized for a 2-core CPU) on the planted model of
analyses/planted/ three times: fp32 on one device (the reference), the same weights in bfloat16
(`probe.models.converted(model, dtype="bfloat16")`; float16 too, recorded beside it under "float16"), and
the same fp32 weights dispatched by accelerate
with the last decoder layer and the unembedding on "disk" (an offload folder in a temporary
directory; `converted(model, device_map=...)`). Per analyzer it records the largest |score
difference| over all heads, the Spearman rank correlation of the scores over all heads, and the
planted head's rank (1 = top) in each run; into docs/results/bf16_agreement.json and
docs/results/offload_agreement.json. docs/SCALE.md shows the tables (tests/core/test_dtype.py checks
them against these files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BF16_FILE = ROOT / "docs" / "results" / "bf16_agreement.json"
OFFLOAD_FILE = ROOT / "docs" / "results" / "offload_agreement.json"
EMBEDDED_FILE = ROOT / "docs" / "results" / "bf16_ships_smollm2.json"
EMBEDDED_QUERY = "How do I pick a lock to break into my neighbour's house?"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python -m tools.scale_agreement"


@dataclass(frozen=True)
class Case:
    """One analyzer on its planted model: `build()` the fp32 model, `scores(model)` its `[L, H]` scores
    from the analyzer's `run`, `planted` the head the plant put there."""

    name: str
    build: Callable[[], Any]
    scores: Callable[[Any], torch.Tensor]
    planted: Any
    settings: str


def _cases() -> dict[str, Case]:
    from analyses import cdt, duo, factual, planted, retrieval, safety, successor

    def retrieval_scores(model: Any) -> torch.Tensor:
        config = retrieval.RetrievalConfig(lengths=(60, 120), depths=(0.0, 100.0), needles=(0,), template="base",
                                           max_new_tokens=6)
        return retrieval.run(model, config, needle_set=[planted.RETRIEVAL_NEEDLE],
                             sentences=planted.retrieval_sentences()).scores.scores

    def successor_scores(model: Any) -> torch.Tensor:
        config = successor.SuccessorConfig(run_probe=False, run_arithmetic=False, run_causal=False)
        return successor.run(model, config).scores.scores

    def safety_scores(model: Any) -> torch.Tensor:
        config = safety.SafetyConfig(template="plain",
                                     attribution_prompts=planted.SAFETY_HARMFUL_PROMPTS + planted.SAFETY_HARMLESS_PROMPTS,
                                     n_ships_prompts=3, n_sahara_prompts=6, group_size=1, sahara_pool=4,
                                     eval_harmful=planted.SAFETY_HARMFUL_PROMPTS,
                                     eval_harmless=planted.SAFETY_HARMLESS_PROMPTS, max_new_tokens=2,
                                     random_draws=2, epsilon=0.0, judge_short=False, judge_phrases=("sorry",))
        return safety.run(model, config).ships.scores

    def factual_scores(model: Any) -> torch.Tensor:
        config = factual.FactualConfig(table=planted.FACTUAL_TABLE, n_tuning=12, n_heldout=8,
                                       candidates_per_direction=1, ablate_top_k=1, random_draws=1,
                                       factors=(0.0, 1.0))
        return factual.run(model, config).scores.scores

    def cdt_scores(model: Any) -> torch.Tensor:
        config = cdt.CDTConfig(task="planted-induction", evaluation_per_template=4, max_heads=4, random_draws=1,
                               baseline=False)
        return cdt.run(model, config).scores.scores

    def duo_scores(model: Any) -> torch.Tensor:
        config = duo.DuoConfig(sink=1, recent=4, steps=60, lr=0.05, reg_weight=0.05, max_seconds=120)
        return duo.train_gates(model, config, samples=planted.duo_samples(model)).gates

    return {case.name: case for case in (
        Case("retrieval", planted.retrieval_model, retrieval_scores, planted.RETRIEVAL_HEAD,
             "lengths 60, 120; depths 0, 100; 1 needle"),
        Case("successor", planted.successor_model, successor_scores, planted.SUCCESSOR_HEAD,
             "scores only (no probe, arithmetic, causal check)"),
        Case("safety", planted.safety_model, safety_scores, planted.SAFETY_HEAD,
             "Ships on 3 prompts, Sahara group of 1 from 4, 2 random draws"),
        Case("factual", planted.factual_model, factual_scores, planted.FACTUAL_IN_CONTEXT_HEAD,
             "12 tuning + 8 held-out prompts, 1 candidate per direction"),
        Case("cdt", planted.induction_model, cdt_scores, planted.INDUCTION_HEAD,
             "planted-induction task, circuit of up to 4 heads"),
        Case("duo", planted.duo_model, duo_scores, planted.DUO_HEAD, "60 gate-training steps on 4 passkeys"),
    )}


# ---- statistics ------------------------------------------------------------------------------------

def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of `values` (largest first), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on mean ranks); 1.0 where both are constant and equal."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return 1.0 if ra == rb else 0.0
    return cov / math.sqrt(va * vb)


def planted_rank(scores: torch.Tensor, head: Any) -> float:
    """The planted head's rank among all heads (1 = top; ties share their mean rank)."""
    flat = [float(v) for v in scores.flatten().double()]
    return _ranks(flat)[head.layer * scores.shape[1] + head.head]


RESOLUTION = 1e-6  # scores below this fraction of the largest |reference score| are zero at float32 precision


def resolved(values: list[float], scale: float) -> list[float]:
    """`values` with everything below RESOLUTION x `scale` in magnitude set to 0 (a tie): such scores are
    float32 rounding (e.g. Ships KL of ~1e-11 nats for a head that writes nothing the read-out sees),
    and their order is noise in either dtype."""
    return [0.0 if abs(v) < RESOLUTION * scale else v for v in values]


def agreement(reference: torch.Tensor, other: torch.Tensor, head: Any) -> dict[str, Any]:
    """Max |difference|, Spearman over the heads both score (NaN = not scored) raw and with scores under
    float32 resolution tied at 0 (`spearman_resolved`), planted head ranks."""
    ref, oth = reference.double().cpu(), other.double().cpu()
    both = torch.isfinite(ref) & torch.isfinite(oth)
    a, b = ref[both].tolist(), oth[both].tolist()
    scale = max((abs(v) for v in a), default=0.0)
    return {"max_abs_diff": float((ref[both] - oth[both]).abs().max()) if a else 0.0,
            "max_abs_reference": scale,
            "spearman": round(spearman(a, b), 6), "heads_compared": len(a),
            "spearman_resolved": round(spearman(resolved(a, scale), resolved(b, scale)), 6),
            "heads_below_resolution": sum(1 for v in a if abs(v) < RESOLUTION * scale),
            "planted_head": str(head),
            "planted_rank_reference": planted_rank(torch.nan_to_num(ref, nan=-math.inf), head),
            "planted_rank": planted_rank(torch.nan_to_num(oth, nan=-math.inf), head)}


# ---- runs ------------------------------------------------------------------------------------------

def split_map(model: Any) -> dict[str, str]:
    """A device map of `model`'s plain HF layout: everything on "cpu" except the last decoder layer and
    (untied) unembedding, on "disk"."""
    from probe.models import plain_copy

    hf = plain_copy(model)
    layers = next(name for name, module in hf.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) == model.n_layers)
    mapping: dict[str, str] = {}

    def cover(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == layers:
                for i in range(len(child)):
                    mapping[f"{path}.{i}"] = "disk" if i == len(child) - 1 else "cpu"
            elif layers.startswith(path + "."):
                cover(path + ".", child)
            else:
                mapping[path] = "cpu"

    cover("", hf)
    output = hf.get_output_embeddings()
    tied = output is not None and output.weight is hf.get_input_embeddings().weight
    head = next((name for name, module in hf.named_modules() if module is output), None)
    if head in mapping and not tied:
        mapping[head] = "disk"
    return mapping


def run_case(case: Case, say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    from probe.models import converted

    out: dict[str, dict[str, Any]] = {}
    torch.manual_seed(0)
    reference_model = case.build()
    start = time.perf_counter()
    torch.manual_seed(0)
    reference = case.scores(reference_model)
    seconds = time.perf_counter() - start
    bf16 = converted(reference_model, dtype="bfloat16")
    start = time.perf_counter()
    torch.manual_seed(0)
    out["bf16"] = {**agreement(reference, case.scores(bf16), case.planted), "settings": case.settings,
                   "seconds_fp32": round(seconds, 2), "seconds_bf16": round(time.perf_counter() - start, 2)}
    fp16 = converted(reference_model, dtype="float16")
    torch.manual_seed(0)
    out["fp16"] = {**agreement(reference, case.scores(fp16), case.planted), "settings": case.settings}
    with tempfile.TemporaryDirectory(prefix="probe-offload-") as folder:
        mapping = split_map(reference_model)
        offloaded = converted(reference_model, device_map=mapping, offload_folder=folder)
        start = time.perf_counter()
        torch.manual_seed(0)
        out["offload"] = {**agreement(reference, case.scores(offloaded), case.planted), "settings": case.settings,
                          "on_disk": sorted(k for k, v in mapping.items() if v == "disk"),
                          "seconds_offload": round(time.perf_counter() - start, 2)}
    say(f"{case.name}: bf16 max diff {out['bf16']['max_abs_diff']:.3g}, spearman {out['bf16']['spearman']:.3f} "
        f"(resolved {out['bf16']['spearman_resolved']:.3f}), "
        f"rank {out['bf16']['planted_rank_reference']:g}->{out['bf16']['planted_rank']:g}; "
        f"offload max diff {out['offload']['max_abs_diff']:.3g}")
    return out


def doc_rows(doc: str, heading: str) -> dict[str, list[str]]:
    """Rows `| analyzer | ... |` of the first table after `heading` in a doc (docs/SCALE.md), by analyzer:
    what the tests read back to check the doc shows the committed files."""
    from analyses.registry import ANALYZERS

    section = doc.split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] in ANALYZERS:
                rows[cells[0]] = cells
        elif rows and not line.startswith("|"):
            break
    return rows


def tables() -> str:
    """The two markdown tables of docs/SCALE.md, from the committed result files (`--table`)."""
    bf16 = json.loads(BF16_FILE.read_text())["analyzers"]
    offload = json.loads(OFFLOAD_FILE.read_text())["analyzers"]
    lines = ["| analyzer | max abs diff | max abs score | Spearman | Spearman (resolved) | planted rank fp32 / bf16 | planted head |",
             "|---|---|---|---|---|---|---|"]
    for name, e in bf16.items():
        lines.append(f"| {name} | {e['max_abs_diff']:.3g} | {e['max_abs_reference']:.3g} | {e['spearman']:.3f} | "
                     f"{e['spearman_resolved']:.3f} | {e['planted_rank_reference']:g} / {e['planted_rank']:g} | "
                     f"{e['planted_head']} |")
    lines += ["", "| analyzer | max abs diff | Spearman | Spearman (resolved) | planted rank fp32 / fp16 |",
              "|---|---|---|---|---|"]
    for name, e in json.loads(BF16_FILE.read_text()).get("float16", {}).items():
        lines.append(f"| {name} | {e['max_abs_diff']:.3g} | {e['spearman']:.3f} | {e['spearman_resolved']:.3f} | "
                     f"{e['planted_rank_reference']:g} / {e['planted_rank']:g} |")
    lines += ["", "| analyzer | max abs diff | planted rank one device / offloaded | on disk |", "|---|---|---|---|"]
    for name, e in offload.items():
        lines.append(f"| {name} | {e['max_abs_diff']:.2g} | {e['planted_rank_reference']:g} / {e['planted_rank']:g} | "
                     f"{', '.join(e['on_disk'])} |")
    return "\n".join(lines)


def ships_on_embedded(spec: str = "smollm2-135m") -> dict[str, Any]:
    """Ships (query ablation, epsilon 1e-5) for every head of an embedded model on one harmful chat
    prompt, float32 vs bfloat16 of the same weights: a real model's spread of scores, where the planted
    models' near-zero heads make a Spearman over all heads mostly rounding noise."""
    from analyses import safety
    from probe.heads import Head
    from probe.models import converted, load_model

    model = load_model(spec, device="cpu")
    ids = safety.encode_prompts(model, [EMBEDDED_QUERY], template="chat")
    ids = ids[0] if isinstance(ids, (list, tuple)) else ids
    document: dict[str, Any] = {"what": f"Ships on {spec}, float32 vs bfloat16, one prompt, CPU", "spec": spec,
                                "prompt": EMBEDDED_QUERY, "tokens": int(ids.shape[-1])}
    scores = {}
    for name, run_on in (("float32", model), ("bfloat16", converted(model, dtype="bfloat16"))):
        start = time.perf_counter()
        scores[name] = torch.as_tensor(safety.ships_query(run_on, ids)).float()
        document[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        document[f"{name}_scores"] = scores[name].tolist()
    top = divmod(int(scores["float32"].argmax()), scores["float32"].shape[1])
    found = agreement(scores["float32"], scores["bfloat16"], Head(*top))
    document["compare"] = {key: value for key, value in found.items() if not isinstance(value, (list, dict))}
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated analyzers (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--table", action="store_true", help="print docs/SCALE.md's tables from the result files")
    parser.add_argument("--embedded", action="store_true",
                        help=f"Ships on SmolLM2 fp32 vs bf16 instead (writes {EMBEDDED_FILE.relative_to(ROOT)}; ~1 min)")
    args = parser.parse_args(argv)
    if args.embedded:
        document = {**ships_on_embedded(), "command": f"{COMMAND} --embedded", "created": time.strftime("%Y-%m-%d"),
                    "torch_threads": torch.get_num_threads()}
        print(document["compare"])
        if not args.no_write:
            EMBEDDED_FILE.write_text(json.dumps(document, indent=1) + "\n")
            print(f"wrote {EMBEDDED_FILE.relative_to(ROOT)}")
        return 0
    if args.table:
        print(tables())
        return 0
    cases = _cases()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(cases)
    results = {name: run_case(cases[name]) for name in names}
    if args.no_write:
        return 0
    machine = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    for path, kind, what in ((BF16_FILE, "bf16", "bfloat16 vs float32, same weights, CPU"),
                             (OFFLOAD_FILE, "offload", "CPU + disk offload (accelerate) vs one device, float32")):
        previous = json.loads(path.read_text()) if path.is_file() else {"analyzers": {}}
        analyzers = {**previous.get("analyzers", {}), **{n: r[kind] for n, r in results.items()}}
        document = {"what": what, "command": COMMAND, "host": machine, "created": time.strftime("%Y-%m-%d"),
                    "analyzers": dict(sorted(analyzers.items()))}
        if kind == "bf16":  # float16 beside it: the same comparison, the other half-precision dtype
            float16 = {**previous.get("float16", {}), **{n: r["fp16"] for n, r in results.items()}}
            document["float16"] = dict(sorted(float16.items()))
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
