"""Retrieval heads: fast path (cached greedy decode, rows from captured rotated q/k) vs the slow reference
(no cache, a full forward with the full attention pattern per answer token), on the same samples.

Prints a table and writes bench/results/retrieval.json: seconds, peak RSS increase (psutil, sampled every
5 ms), whether the argmax rows and scores are identical, and the speed ratio.

Models: `--model random` (default) is a random-weight Llama of SmolLM2-135M's exact shape (30 layers,
9 query / 3 KV heads, d_model 576, vocab 49,152) with SmolLM2's tokenizer-free word prompts: speed does not
depend on the weight values, and no 50 s GGUF load. `--model smollm2-135m` uses the real model.

At long contexts the reference is expensive (one full forward per answer token): `--ref-steps` caps the
reference's decode steps; the fast path then decodes `--steps` tokens, and the table gives both the
measured times and the per-answer-token extrapolation `ref_seconds / ref_steps * steps` (marked).

    .venv/bin/python bench/bench_retrieval.py --lengths 1024 4096 --steps 16 --ref-steps 16 4 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from analyses.data.haystack import NiahSample
from analyses.data.needles import NEEDLES
from analyses.retrieval import fast_sample, reference_sample

RESULTS = Path(__file__).parent / "results" / "retrieval.json"


class PeakRss:
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.process = interval, psutil.Process(os.getpid())

    def __enter__(self) -> PeakRss:
        _release_free_memory()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a phase's growth is not hidden by memory
    an earlier phase freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", help="random (SmolLM2 shape) or smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=16, help="answer tokens decoded by the fast path")
    parser.add_argument("--ref-steps", type=int, nargs="+", default=[16, 4],
                        help="reference decode steps per length (last value repeats)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--reference-first", action="store_true", help="measure the reference before the fast path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.model == "random":
        model = random_smollm2_shape()
    else:
        from probe.models import load_model

        model = load_model(args.model, device="cpu")
    load_seconds = time.perf_counter() - started

    rows = []
    for index, length in enumerate(args.lengths):
        ref_steps = min(args.ref_steps[min(index, len(args.ref_steps) - 1)], args.steps)
        sample = make_sample(model, length, index) if args.model == "random" else real_sample(model, length)
        fast_sample(model, dataclasses.replace(sample, input_ids=sample.input_ids[:64]), 2, stop=False)  # warm-up
        def run_fast() -> tuple[Any, float, float]:
            with PeakRss() as memory:
                t0 = time.perf_counter()
                trace = fast_sample(model, sample, args.steps, stop=False)
                seconds = time.perf_counter() - t0
            return trace, seconds, memory.mib

        def run_reference() -> tuple[Any, float, float]:
            with PeakRss() as memory:
                t0 = time.perf_counter()
                trace = reference_sample(model, sample, ref_steps, stop=False)
                seconds = time.perf_counter() - t0
            return trace, seconds, memory.mib

        if args.reference_first:
            slow, ref_seconds, ref_mib = run_reference()
            fast, fast_seconds, fast_mib = run_fast()
        else:
            fast, fast_seconds, fast_mib = run_fast()
            slow, ref_seconds, ref_mib = run_reference()
        steps = len(fast.answer_ids)
        done = len(slow.answer_ids)
        identical = (fast.answer_ids[:done] == slow.answer_ids
                     and torch.equal(fast.argmax[..., :done], slow.argmax))
        ref_full = ref_seconds / done * steps
        row = {
            "prompt_tokens": sample.prompt_len, "answer_tokens": steps, "reference_steps_measured": done,
            "fast_seconds": round(fast_seconds, 3), "reference_seconds": round(ref_seconds, 3),
            "reference_seconds_for_all_steps": round(ref_full, 3), "extrapolated": done < steps,
            "speed_ratio": round(ref_full / fast_seconds, 2),
            "fast_peak_rss_mib": round(fast_mib, 1), "reference_peak_rss_mib": round(ref_mib, 1),
            "identical_rows_and_answers": bool(identical),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel: {model.spec} ({model.n_layers}L x {model.n_heads}H, {model.n_kv_heads} KV), threads {args.threads}")
    header = f"{'tokens':>7} {'answer':>6} {'fast s':>8} {'ref s':>9} {'ratio':>7} {'fast MiB':>9} {'ref MiB':>9} identical"
    print(header)
    for r in rows:
        mark = "*" if r["extrapolated"] else " "
        print(f"{r['prompt_tokens']:>7} {r['answer_tokens']:>6} {r['fast_seconds']:>8.1f} "
              f"{r['reference_seconds_for_all_steps']:>8.1f}{mark} {r['speed_ratio']:>7.1f} "
              f"{r['fast_peak_rss_mib']:>9.0f} {r['reference_peak_rss_mib']:>9.0f} {r['identical_rows_and_answers']}")
    print("* reference time extrapolated from the measured steps (time per answer token x answer tokens)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "retrieval", "model": model.spec, "threads": args.threads, "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "load_seconds": round(load_seconds, 1), "load_average": os.getloadavg(), "rows": rows,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
