"""Retrieval heads: fast path (SDPA prefill, cached greedy decode, rows from cached keys and captured rotated
queries) vs the slow reference (no cache, a full forward with the full attention pattern per answer token),
on the same samples.

Every measurement runs in its own child process (this script re-invoked with `--phase fast|reference`), so
the phases never share an allocator and peak memory is fair: the child loads the model, warms up, resets
its peak-RSS mark (`/proc/self/clear_refs`), runs the phase and reports `getrusage(RUSAGE_SELF).ru_maxrss`
above its RSS before the phase. The parent compares the children's answers and argmax rows, prints a table
and writes bench/results/retrieval.json: seconds, peak RSS, identity, speed ratio, thread count, machine.

Models: `--model random` (default) is a random-weight Llama of SmolLM2-135M's exact shape (30 layers,
9 query / 3 KV heads, d_model 576, vocab 49,152) on random token ids: speed does not depend on the weight
values, and no 50 s GGUF load. `--model smollm2-135m` uses the real model on real NIAH prompts.

The reference is expensive at long contexts (one full forward per answer token). By default it runs
`--ref-steps` decode steps per length and its time is extrapolated per answer token to `--steps`
(`ref_seconds / ref_steps * steps`, marked `*` and `"extrapolated": true`); `--full-reference` runs it
for every answer token at every length (no extrapolation). The fast path always decodes `--steps` tokens.

    .venv/bin/python bench/bench_retrieval.py --lengths 1024 4096 --steps 16 --threads 1 --full-reference
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from analyses.data.haystack import NiahSample
from analyses.data.needles import NEEDLES

RESULTS = Path(__file__).parent / "results" / "retrieval.json"


def random_smollm2_shape() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from probe.models import wrap_hf_model
    from probe.tiny import word_tokenizer

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return wrap_hf_model(model, word_tokenizer(), "random-smollm2-shape", hub_name="probe/random-smollm2-shape",
                         device="cpu")


def make_sample(model: Any, length: int, seed: int) -> NiahSample:
    """A prompt of `length` random token ids with a pretend needle span in the middle (speed only)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(model.d_vocab, 40000), (length,), generator=generator).tolist()
    middle = length // 2
    return NiahSample(needle_index=0, needle=NEEDLES[0], template="base", context_length=length, depth=50.0,
                      prompt="", input_ids=tuple(ids), context_tokens=length, actual_depth=0.5,
                      needle_chars=(0, 0), answer_chars=(0, 0), needle_tokens=(middle - 2, middle + 14),
                      answer_tokens=(middle, middle + 12))


def real_sample(model: Any, length: int) -> NiahSample:
    from analyses.data.haystack import build_grid

    return build_grid(model.tokenizer, [length], [50.0], (0,), "chat").samples[0]


# ---- one phase, in a child process ---------------------------------------------------------------

def _rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark to the current RSS, so `ru_maxrss` measures the phase, not the load."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, then time one phase on one prompt length; the result goes to stdout as JSON."""
    import gc

    from analyses.retrieval import fast_sample, reference_sample
    from probe.fused_prefill import native_attention
    from probe.generation import growing_cache

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.model == "random":
        model = random_smollm2_shape()
    else:
        from probe.models import load_model

        model = load_model(args.model, device="cpu")
    load_seconds = time.perf_counter() - started
    length = args.lengths[0]
    sample = make_sample(model, length, args.seed) if args.model == "random" else real_sample(model, length)
    short = dataclasses.replace(sample, input_ids=sample.input_ids[:64])
    if args.phase == "fast":
        fast_sample(model, short, 2, stop=False)  # warm-up (kernels, allocator)
    else:
        reference_sample(model, short, 2, stop=False)
    gc.collect()
    rss_before = _rss_mib()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    if args.phase == "fast":
        trace = fast_sample(model, sample, args.steps, stop=False)
    else:
        trace = reference_sample(model, sample, args.steps, stop=False)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    row: dict[str, Any] = {
        "phase": args.phase, "prompt_tokens": sample.prompt_len, "steps": len(trace.answer_ids),
        "seconds": seconds, "rss_before_mib": rss_before, "peak_rss_mib": peak,
        "peak_above_before_mib": peak - rss_before, "peak_reset": reset, "load_seconds": load_seconds,
        "answer_ids": trace.answer_ids, "argmax": trace.argmax.tolist(), "model": model.spec,
        "shape": f"{model.n_layers}L x {model.n_heads}H, {model.n_kv_heads} KV",
    }
    if args.phase == "fast":  # the prefill alone (after the measurement, so it does not touch the numbers above)
        ids = sample.ids(model.device)[:, :-1]
        with torch.no_grad(), native_attention(model) as native:
            t0 = time.perf_counter()
            model.hf_model(ids, past_key_values=growing_cache(), use_cache=True, logits_to_keep=1)
            row["prefill_seconds"] = time.perf_counter() - t0
        row["prefill_sdpa"] = native
    return row


def spawn_phase(args: argparse.Namespace, phase: str, length: int, steps: int, seed: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--lengths", str(length),
               "--steps", str(steps), "--threads", str(args.threads), "--model", args.model, "--seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{phase} phase at {length} tokens failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the comparison, in the parent ---------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", help="random (SmolLM2 shape) or smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=16, help="answer tokens decoded by the fast path")
    parser.add_argument("--ref-steps", type=int, nargs="+", default=[16, 4],
                        help="reference decode steps per length (last value repeats); ignored with --full-reference")
    parser.add_argument("--full-reference", action="store_true",
                        help="run the reference for every answer token at every length (no extrapolation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--phase", choices=("fast", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return

    rows = []
    info: dict[str, Any] = {}
    for index, length in enumerate(args.lengths):
        ref_steps = args.steps if args.full_reference else min(args.ref_steps[min(index, len(args.ref_steps) - 1)],
                                                                args.steps)
        fast = spawn_phase(args, "fast", length, args.steps, index)
        slow = spawn_phase(args, "reference", length, ref_steps, index)
        info = {"model": fast["model"], "shape": fast["shape"], "load_seconds": round(fast["load_seconds"], 1)}
        steps, done = fast["steps"], slow["steps"]
        identical = (fast["answer_ids"][:done] == slow["answer_ids"]
                     and torch.equal(torch.tensor(fast["argmax"])[..., :done], torch.tensor(slow["argmax"])))
        ref_full = slow["seconds"] / done * steps
        row = {
            "prompt_tokens": fast["prompt_tokens"], "answer_tokens": steps, "reference_steps_measured": done,
            "fast_seconds": round(fast["seconds"], 3), "fast_prefill_seconds": round(fast["prefill_seconds"], 3),
            "prefill_sdpa": fast["prefill_sdpa"], "reference_seconds": round(slow["seconds"], 3),
            "reference_seconds_for_all_steps": round(ref_full, 3), "extrapolated": done < steps,
            "speed_ratio": round(ref_full / fast["seconds"], 2),
            "fast_peak_rss_mib": round(fast["peak_above_before_mib"], 1),
            "reference_peak_rss_mib": round(slow["peak_above_before_mib"], 1),
            "fast_rss_before_mib": round(fast["rss_before_mib"], 1),
            "reference_rss_before_mib": round(slow["rss_before_mib"], 1),
            "peak_reset": bool(fast["peak_reset"] and slow["peak_reset"]),
            "identical_rows_and_answers": bool(identical),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel: {info['model']} ({info['shape']}), threads {args.threads}, each phase in its own process")
    print(f"{'tokens':>7} {'answer':>6} {'fast s':>8} {'prefill s':>9} {'ref s':>9} {'ratio':>7} "
          f"{'fast MiB':>9} {'ref MiB':>9} identical")
    for r in rows:
        mark = "*" if r["extrapolated"] else " "
        print(f"{r['prompt_tokens']:>7} {r['answer_tokens']:>6} {r['fast_seconds']:>8.1f} "
              f"{r['fast_prefill_seconds']:>9.1f} {r['reference_seconds_for_all_steps']:>8.1f}{mark} {r['speed_ratio']:>7.1f} "
              f"{r['fast_peak_rss_mib']:>9.0f} {r['reference_peak_rss_mib']:>9.0f} {r['identical_rows_and_answers']}")
    if any(r["extrapolated"] for r in rows):
        print("* reference time extrapolated from the measured steps (time per answer token x answer tokens)")
    print("MiB: peak RSS above the RSS before the phase (ru_maxrss after a peak reset, in a fresh process)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "retrieval", **info, "threads": args.threads, "full_reference": args.full_reference,
        "isolated_processes": True, "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg(), "rows": rows,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
