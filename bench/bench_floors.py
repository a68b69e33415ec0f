"""Each analyzer's time divided by its floor, the time plain Hugging Face SDPA takes to push the same tokens
through the same layers.

The work is counted from the analyzer's own run, not estimated from its config:

- every decoder-layer call (a forward pre-hook on each of the bridge's block components, the modules in the
  HF layer list, so bridge forwards, fused forwards, `probe.forward.run_from_layer`'s partial forwards and
  cached decoding steps all count) adds one pass of shape (batch, query length, key length), the key
  length being the query length plus what the layer's KV cache already holds;
- a layer output that takes part in a backward (a gradient hook on it: Duo's gate training) adds one
  backward pass of that shape; the recomputation of gradient checkpointing is not work of the floor;
- CD-T's contextual-decomposition engine does its own layer arithmetic (`analyses/cdt/fast.py`, β-only
  passes over cached clean totals; `analyses/cdt/engine.py`, the two-stream reference): each of its layer
  steps adds one forward pass of its rows (sources x prompts) x tokens, i.e. it is reported against one
  plain forward of the same tokens.

The floor of a shape is the time of one plain-HF SDPA forward (`attn_implementation="sdpa"`, never bridged,
the same GGUF weights, `bench_fused.plain_sdpa_copy`) of the decoder on random embeddings of that shape,
divided by the number of layers (the embedding and unembedding are not part of the floor); with a KV cache
of the right length where the key length exceeds the query length (decode steps: the cache length rounded
up to a multiple of `--decode-bucket`); forward + backward into the input embeddings (no weight
gradients: the weights are frozen in the analyzers too) for backward passes. Best of `--floor-repeats`
per shape. An analyzer's floor is the sum over its counted passes; its ratio is its best-of-`--repeats`
wall time over that floor. For safety, successor and CD-T the time and the work are also split by stage
(Ships / Sahara / validation; scores / causal check; task + sweep / circuit search / path patching / evaluation),
from their progress messages.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_floors.py                       # quick preset, best of 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_floors.py --preset default --analyses successor,cdt --repeats 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_floors.py --smoke                # tiny-llama, seconds: harness check

Writes bench/results/floors.json (rows of several runs are merged by analyzer and preset; each row names
its commit, time and load averages). The machine is shared: the load average before and after each
analyzer is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_fused import _commit, _loadavg, plain_sdpa_copy  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "floors.json"
ALL = ("retrieval", "duo", "successor", "safety", "factual", "cdt")
Shape = tuple[int, int, int]  # (batch rows, query length, key length)


# ---- counting the analyzer's work ---------------------------------------------------------------------

class Work:
    """Layer passes by shape, split by stage: `forward[stage][(b, q, k)]`, `backward[...]`, `engine[...]`."""

    def __init__(self) -> None:
        self.forward: dict[str, Counter[Shape]] = {}
        self.backward: dict[str, Counter[Shape]] = {}
        self.engine: dict[str, Counter[Shape]] = {}
        self.stage = "all"

    def add(self, kind: str, shape: Shape) -> None:
        getattr(self, kind).setdefault(self.stage, Counter())[shape] += 1

    def merged(self, kind: str, stage: str | None = None) -> Counter[Shape]:
        total: Counter[Shape] = Counter()
        for name, counts in getattr(self, kind).items():
            if stage is None or name == stage:
                total.update(counts)
        return total

    def stages(self) -> list[str]:
        return sorted({*self.forward, *self.backward, *self.engine})

    def token_layers(self, kind: str, stage: str | None = None) -> int:
        return sum(b * q * n for (b, q, _), n in self.merged(kind, stage).items())


def _uncommitted() -> list[str]:
    """Tracked files of the core and the analyzers with uncommitted changes in this checkout (the working
    tree may hold work in progress: a run measures what is on disk, not only the named commit)."""
    import subprocess

    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "probe", "analyses"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    return sorted(line[3:] for line in done.stdout.splitlines() if line.strip())


def _cache_length(cache: Any, layer: int) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


@contextlib.contextmanager
def counting(model: Any, work: Work) -> Iterator[None]:
    """Count every decoder-layer pass of `model` (and CD-T engine layer steps) into `work` for the block."""
    from analyses.cdt import engine as cdt_engine
    from analyses.cdt import fast as cdt_fast

    handles = []
    for index, block in enumerate(model.bridge.blocks):
        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
            batch, q = int(hidden.shape[0]), int(hidden.shape[1])
            work.add("forward", (batch, q, q + _cache_length(cache, index)))
            module._bench_shape = (batch, q, q + _cache_length(cache, index))

        def post(module: Any, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                shape = module._bench_shape
                work_stage = work.stage

                def on_grad(grad: torch.Tensor) -> None:
                    before, work.stage = work.stage, work_stage
                    work.add("backward", shape)
                    work.stage = before

                out.register_hook(on_grad)

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))

    fast_attention = cdt_fast.BetaPass.attention
    two_stream_block = cdt_engine.Engine.block

    def attention(self: Any, index: int, beta: Any, hooks: Any) -> Any:
        out = fast_attention(self, index, beta, hooks)
        counted = out[0] if out[0] is not None else out[1]  # β rows [S, P, T, d], else the clean totals [P, T, d]
        rows = math.prod(counted.shape[:-2])
        work.add("engine", (rows, int(counted.shape[-2]), int(counted.shape[-2])))
        return out

    def block(self: Any, index: int, resid: Any, hooks: Any = None, record: Any = None) -> Any:
        beta = resid[0]
        rows = math.prod(beta.shape[:-2])
        work.add("engine", (rows, int(beta.shape[-2]), int(beta.shape[-2])))
        return two_stream_block(self, index, resid, hooks, record)

    cdt_fast.BetaPass.attention = attention
    cdt_engine.Engine.block = block
    try:
        yield
    finally:
        cdt_fast.BetaPass.attention = fast_attention
        cdt_engine.Engine.block = two_stream_block
        for handle in handles:
            handle.remove()


def safety_stage(fraction: float, message: str) -> str:
    """safety.run reports Ships in [0, 0.3], Sahara in (0.3, 0.6], validation above."""
    if message.startswith("Ships"):
        return "ships"
    if message.startswith("Sahara") or fraction <= 0.6:
        return "sahara"
    return "validation"


def successor_stage(fraction: float, message: str) -> str:
    """successor.run announces each stage as it starts: scores, probe and arithmetic below 0.6 (weight
    products, no layer pass but MLP0's), then the causal check (the forwards)."""
    return "causal check" if fraction >= 0.6 else "scores, probe, arithmetic"


def cdt_stage(fraction: float, message: str) -> str:
    """cdt.run announces each stage as it starts: the task and the decomposition sweep (clean and reference
    caches, the two-stream engine), the circuit search, the path-patching baseline, then the evaluation
    (faithfulness curves against random circuits, task accuracy)."""
    if message.startswith(("building", "CD-T sweep")):
        return "task, sweep"
    if message.startswith("circuit search"):
        return "circuit search"
    if message.startswith("path-patching"):
        return "path patching"
    return "evaluation"


class AnnouncedStages:
    """For an analyzer whose messages announce the stage that starts (successor), where `StageClock` books
    the time up to a message to that message's stage: here it goes to the stage the message before announced."""

    def __init__(self, stage_of: Callable[[float, str], str], first: str = "setup") -> None:
        self.stage_of, self.current = stage_of, first

    def __call__(self, fraction: float, message: str) -> str:
        done, self.current = self.current, self.stage_of(fraction, message)
        return done


# a fresh stage function per run (AnnouncedStages keeps the stage under way)
STAGES: dict[str, Callable[[], Callable[[float, str], str]]] = {
    "safety": lambda: safety_stage, "successor": lambda: AnnouncedStages(successor_stage),
    "cdt": lambda: AnnouncedStages(cdt_stage)}


class StageClock:
    """Progress callback: work and time since the previous message belong to this message's stage."""

    def __init__(self, work: Work, stage_of: Callable[[float, str], str] | None) -> None:
        self.work, self.stage_of = work, stage_of
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.mark, self.mark_cpu = time.perf_counter(), time.process_time()

    def _tick(self, stage: str) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.mark
        self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + now_cpu - self.mark_cpu
        self.mark, self.mark_cpu = now, now_cpu
        for kind in ("forward", "backward", "engine"):
            counts = getattr(self.work, kind).pop("pending", None)
            if counts:
                getattr(self.work, kind).setdefault(stage, Counter()).update(counts)

    def __call__(self, fraction: float, message: str) -> None:
        if self.stage_of is None:
            return
        self._tick(self.stage_of(fraction, message))

    def close(self, stage: str) -> None:
        self._tick(stage)


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # CPU seconds of this process (one torch thread): less sensitive to other jobs' load
    work: Work
    stage_wall_s: dict[str, float]
    stage_cpu_s: dict[str, float]


def run_analyzer(model: Any, name: str, preset: str, overrides: dict[str, Any]) -> Run:
    """One run of the analyzer's preset (never from a cache: `module.run` itself) with its work counted."""
    from analyses.registry import ANALYZERS, make_config

    entry = ANALYZERS[name]
    config = make_config(entry, preset, overrides, 0)
    work = Work()
    stage_of = STAGES[name]() if name in STAGES else None
    clock = StageClock(work, stage_of)
    if stage_of is not None:
        work.stage = "pending"
    with counting(model, work):
        start, start_cpu = time.perf_counter(), time.process_time()
        clock.mark, clock.mark_cpu = start, start_cpu
        entry.load().run(model, config, progress=clock)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if stage_of is not None:
        clock.close("after the last message")
    return Run(wall, cpu, work, clock.seconds, clock.cpu_seconds)


# ---- the floor: plain HF SDPA per layer pass ------------------------------------------------------------

class Floor:
    """Seconds per decoder-layer pass of plain HF SDPA by shape (forward; forward + backward), memoised."""

    def __init__(self, plain: Any, repeats: int, decode_bucket: int) -> None:
        self.plain, self.repeats, self.bucket = plain, repeats, decode_bucket
        self.decoder = plain.get_decoder()
        self.n_layers = plain.config.num_hidden_layers
        self.d_model = plain.config.hidden_size
        self.forward_s: dict[Shape, tuple[float, float]] = {}  # (wall, CPU) seconds per layer pass
        self.train_s: dict[Shape, tuple[float, float]] = {}
        self.measured_seconds = 0.0

    def key(self, shape: Shape) -> Shape:
        b, q, k = shape
        if k > q and q == 1 and self.bucket > 1:  # decode steps: the cache length in buckets
            past = int(math.ceil((k - q) / self.bucket) * self.bucket)
            return (b, q, q + past)
        return shape

    def _best(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(best wall seconds, best CPU seconds of this process) over the repeats."""
        wall = cpu = float("inf")
        for _ in range(self.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        return wall, cpu

    def _per_layer(self, seconds: tuple[float, float]) -> tuple[float, float]:
        return seconds[0] / self.n_layers, seconds[1] / self.n_layers

    def _embeds(self, b: int, q: int, grad: bool = False) -> torch.Tensor:
        generator = torch.Generator().manual_seed(b * 100003 + q)
        x = torch.randn(b, q, self.d_model, generator=generator) * 0.02
        return x.requires_grad_(grad)

    def measure(self, forward: set[Shape], train: set[Shape]) -> None:
        """Time every shape not yet known. Cached shapes sharing a batch size share one prefill (cropped)."""
        from transformers import DynamicCache

        start = time.perf_counter()
        todo = sorted({self.key(s) for s in forward} - set(self.forward_s))
        with torch.no_grad():
            for shape in [s for s in todo if s[2] == s[1]]:
                x = self._embeds(shape[0], shape[1])
                self.forward_s[shape] = self._per_layer(self._best(lambda: self.decoder(inputs_embeds=x, use_cache=False)))
            cached = [s for s in todo if s[2] > s[1]]
            for batch in sorted({s[0] for s in cached}):
                group = sorted((s for s in cached if s[0] == batch), key=lambda s: s[2] - s[1], reverse=True)
                cache = DynamicCache()
                longest = group[0][2] - group[0][1]
                self.decoder(inputs_embeds=self._embeds(batch, longest), past_key_values=cache, use_cache=True)
                for shape in group:
                    past = shape[2] - shape[1]
                    x = self._embeds(batch, shape[1])

                    def step(x: torch.Tensor = x, past: int = past) -> None:
                        extra = cache.get_seq_length() - past
                        if extra > 0:
                            cache.crop(-extra)  # a negative count removes that many (old and new transformers)
                        self.decoder(inputs_embeds=x, past_key_values=cache, use_cache=True)

                    self.forward_s[shape] = self._per_layer(self._best(step))
        for shape in sorted({self.key(s) for s in train} - set(self.train_s)):
            if shape[2] != shape[1]:
                raise ValueError(f"a backward through a cached forward {shape} is not measured here")

            def fwd_bwd(shape: Shape = shape) -> None:
                x = self._embeds(shape[0], shape[1], grad=True)
                with torch.enable_grad():
                    self.decoder(inputs_embeds=x, use_cache=False).last_hidden_state.float().sum().backward()

            self.train_s[shape] = self._per_layer(self._best(fwd_bwd))
        self.measured_seconds += time.perf_counter() - start

    def seconds(self, work: Work, stage: str | None = None) -> dict[str, float]:
        """The floor of `work` (or one stage of it): forward, backward and engine parts, in seconds."""
        out: dict[str, float] = {}
        for i, suffix in ((0, "s"), (1, "cpu_s")):
            fwd = sum(n * self.forward_s[self.key(s)][i] for s, n in work.merged("forward", stage).items())
            bwd = sum(n * (self.train_s[self.key(s)][i] - self.forward_s[self.key(s)][i])
                      for s, n in work.merged("backward", stage).items())
            eng = sum(n * self.forward_s[self.key(s)][i] for s, n in work.merged("engine", stage).items())
            out.update({f"forward_floor_{suffix}": fwd, f"backward_floor_{suffix}": bwd,
                        f"engine_floor_{suffix}": eng, f"floor_{suffix}": fwd + bwd + eng})
        return out


def needed_shapes(work: Work) -> tuple[set[Shape], set[Shape]]:
    forward = set(work.merged("forward")) | set(work.merged("engine")) | set(work.merged("backward"))
    return forward, set(work.merged("backward"))


# ---- the table ------------------------------------------------------------------------------------------

def describe(work: Work, floor: Floor, stage: str | None = None) -> dict[str, Any]:
    fwd, bwd, eng = (work.merged(k, stage) for k in ("forward", "backward", "engine"))
    return {"layer_passes": sum(fwd.values()), "token_layers": work.token_layers("forward", stage),
            "backward_layer_passes": sum(bwd.values()), "backward_token_layers": work.token_layers("backward", stage),
            "engine_layer_passes": sum(eng.values()), "engine_token_layers": work.token_layers("engine", stage),
            "distinct_shapes": len({floor.key(s) for s in (*fwd, *bwd, *eng)}),
            **{k: round(v, 3) for k, v in floor.seconds(work, stage).items()}}


def _ratio(seconds: float, floor: float) -> float:
    return round(seconds / floor, 3) if floor > 0 else float("nan")


def measure(model: Any, names: list[str], preset: str, repeats: int, floor: Floor,
            overrides: dict[str, dict[str, Any]], spec: str) -> Iterator[dict[str, Any]]:
    """Best of `repeats` runs per analyzer, then the floors of the shapes they used (right after, so under
    about the same load): one row per analyzer, yielded as soon as it is measured."""
    from probe.errors import ProbeError

    for name in names:
        load_before = _loadavg()
        runs: list[Run] = []
        try:
            for repeat in range(repeats):
                runs.append(run := run_analyzer(model, name, preset, overrides.get(name, {})))
                print(f"{name} {preset} run {repeat + 1}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, "
                      f"{sum(run.work.merged('forward').values())} layer passes, load {' '.join(_loadavg())}",
                      flush=True)
        except ProbeError as error:  # recorded, the other analyzers still run
            print(f"{name} {preset}: {error}", flush=True)
            yield {"analyzer": name, "preset": preset, "model": spec, "error": str(error).splitlines()[0],
                   "overrides": overrides.get(name, {}), "commit": _commit()}
            continue
        floor_start = time.perf_counter()
        for run in runs:
            floor.measure(*needed_shapes(run.work))
        floor_wall = time.perf_counter() - floor_start
        # best by ratio: a time-budgeted trainer (Duo) does different work in each run
        wall_ratios = [r.wall_s / max(floor.seconds(r.work)["floor_s"], 1e-12) for r in runs]
        cpu_ratios = [r.cpu_s / max(floor.seconds(r.work)["floor_cpu_s"], 1e-12) for r in runs]
        best = min(range(len(runs)), key=lambda i: wall_ratios[i])
        best_cpu = min(range(len(runs)), key=lambda i: cpu_ratios[i])
        run = runs[best]
        row: dict[str, Any] = {
            "analyzer": name, "preset": preset, "model": spec, "seconds": round(run.wall_s, 2),
            "cpu_seconds": round(runs[best_cpu].cpu_s, 2), **describe(run.work, floor),
            "over_floor": round(wall_ratios[best], 3), "over_floor_cpu": round(cpu_ratios[best_cpu], 3),
            "all_run_seconds": [round(r.wall_s, 2) for r in runs], "all_run_cpu_seconds": [round(r.cpu_s, 2) for r in runs],
            "same_work_every_run": all(r.work.merged(k) == run.work.merged(k) for r in runs
                                       for k in ("forward", "backward", "engine")),
            "floor_measuring_s": round(floor_wall, 1),
            "overrides": overrides.get(name, {}), "threads": torch.get_num_threads(), "repeats": repeats,
            "commit": _commit(), "uncommitted": _uncommitted(),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_before": load_before, "load_average_after": _loadavg(),
        }
        if run.stage_wall_s:
            row["stages"] = {}
            for stage in sorted(set(run.stage_wall_s) | set(run.work.stages())):
                part = describe(run.work, floor, stage)
                row["stages"][stage] = {"seconds": round(run.stage_wall_s.get(stage, 0.0), 2),
                                        "cpu_seconds": round(run.stage_cpu_s.get(stage, 0.0), 2), **part,
                                        "over_floor": _ratio(run.stage_wall_s.get(stage, 0.0), part["floor_s"]),
                                        "over_floor_cpu": _ratio(run.stage_cpu_s.get(stage, 0.0), part["floor_cpu_s"])}
        print(json.dumps(row), flush=True)
        yield row


def write(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """Merge `rows` into `out` (a row replaces the one of the same analyzer, preset and model)."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    kept = [r for r in data.get("rows", []) if (r["analyzer"], r["preset"], r.get("model"))
            not in {(n["analyzer"], n["preset"], n.get("model")) for n in rows}]
    order = {name: i for i, name in enumerate(ALL)}
    merged = sorted(kept + rows, key=lambda r: (r.get("model", ""), r["preset"] != "quick", order.get(r["analyzer"], 99)))
    data.update(meta)
    data["rows"] = merged
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--analyses", default=",".join(ALL))
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor-repeats", type=int, default=3)
    parser.add_argument("--decode-bucket", type=int, default=64, help="cache-length bucket of decode-step floors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="ANALYZER.KEY=JSON",
                        help="a config override, e.g. retrieval.lengths=[512,1024] (sizes a default run down)")
    parser.add_argument("--smoke", action="store_true", help="tiny-llama (random weights): checks the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge-log", type=Path, metavar="LOG",
                        help="merge the rows a run printed to LOG (one JSON row per analyzer) into --out, then stop: "
                             "keeps what a run that was stopped early had finished")
    args = parser.parse_args()
    if args.merge_log is not None:
        rows = [json.loads(line) for line in args.merge_log.read_text().splitlines()
                if line.startswith('{"analyzer"')]
        write(rows, args.out, {})
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        analyzer, _, setting = key.partition(".")
        overrides.setdefault(analyzer, {})[setting] = json.loads(value)
    names = [n.strip() for n in args.analyses.split(",") if n.strip()]
    from probe.models import load_model

    spec = "tiny-llama" if args.smoke else "smollm2-135m"
    model = load_model(spec, device="cpu")
    if args.smoke:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(model.hf_model.config, attn_implementation="sdpa").eval()
        plain.load_state_dict({k.replace("_original_component.", ""): v for k, v in model.hf_model.state_dict().items()},
                              strict=False)
    else:
        plain = plain_sdpa_copy()
    for param in plain.parameters():
        param.requires_grad_(False)
    floor = Floor(plain, args.floor_repeats, args.decode_bucket)
    meta = {"bench": "issue 19 point 3: analyzer wall time over plain-HF-SDPA time of the same layer passes",
            "floor": "plain HF SDPA decoder (no bridge), same weights, per layer pass by shape, best of "
                     f"{args.floor_repeats}; decode steps with cache length in buckets of {args.decode_bucket}",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "busy_machine_note": "the 2-core machine was shared with other agents' jobs: see each row's load "
                                 "averages; wall seconds are slower than idle, CPU seconds (this process's, one "
                                 "thread) much less so; the analyzer and its floor ran minutes apart"}
    out = args.out if not args.smoke or args.out != RESULTS else Path("/tmp/floors_smoke.json")
    for row in measure(model, names, args.preset, args.repeats, floor, overrides, spec):
        write([row], out, meta)  # after each analyzer: a run stopped early keeps what it finished


if __name__ == "__main__":
    main()
