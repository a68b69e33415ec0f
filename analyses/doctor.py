"""`probe doctor MODEL`: does probe read this model right? The proof matrix's checks, at a reduced size.

For any spec (embedded, `hf:<folder or hub id>`, `gguf:<file>`, the tiny and registered specs) it says
which bridge adapter and family facts the architecture layer found, then runs each check of the
architecture matrix (tests/test_architectures.py) once on the model itself:

| # | check         | compares                                                                         |
|---|---------------|----------------------------------------------------------------------------------|
| 1 | logits        | the bridge's logits vs an independently loaded Hugging Face copy (fp32, eager)   |
| 2 | left-pad      | a left-padded batch's last-position logits vs each row alone (masked forward)    |
| 3 | left-pad gen  | `probe.generation.greedy_generate` on the batch vs each row alone (ids)           |
| 4 | zero-head     | zero-ablating each query head of one layer (probe's hook_z intervention) vs      |
|   |               | zeroing that head's slice of the copy's output-projection input                  |
| 5 | successor e(t)| e(t) from the layer vs the model's own block 0 on the token alone (hooks)         |
| 6 | successor OV  | each head's OV logits of one layer vs the model's own attention on e(t)          |
| 7 | retrieval     | the cached fast path's argmax keys and answer vs the full-forward reference      |
| 8 | Ships         | the batched query-level Ships vs one forward per ablated head                    |
| 9 | factual DLA   | all-heads direct logit attribution vs removing each head's direct path           |

The copy is loaded again from the same files (embedded GGUF assets, `hf:`, `gguf:`); specs without
files (tiny, registered organisms) get a fresh Hugging Face module tree holding a copy of the loaded
weights (the bridge rewires the wrapped model in place; the fresh tree is not rewired). A family the
architecture layer does not cover is reported as unsupported, naming the missing component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probe import assets
from probe.architecture import ArchitectureError, MissingComponentError, architecture
from probe.errors import ProbeError
from probe.generation import greedy_generate
from probe.heads import Head
from probe.interventions import intervene, zero_ablation
from probe.models import SPECS, LoadedModel, load_model

Progress = Callable[[str], None]

TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12", "a book")
RETRIEVAL_TEXT = " ".join(["the capital of mary is the book of john and the key to the park"] * 2)
FACTUAL_TEXT = "the capital of mary is the key . q: what is the capital of mary ? a:"
KL_NOISE = 1e-6  # nats: KLs this small between fp32 distributions are rounding (tiny random models)
MOVED = 1e-3  # an ablation that moves the logits less than this changed nothing (a hook that fires and does nothing)


class DoctorError(ProbeError):
    """A model the doctor cannot check (e.g. not loaded in float32)."""


@dataclass(frozen=True)
class DoctorSize:
    """How much of the model each check covers (the matrix's checks, cut down for a 2-core CPU)."""

    layer: int | None = None          # the layer of checks 4 and 6 (None: the middle layer)
    successor_tokens: int = 6         # task tokens of checks 5 and 6
    generate_tokens: int = 4          # new tokens of checks 3 and 7
    ships_layers: int = 1             # check 8: the heads of this many layers (1: the check layer)
    factual_layers: int = 1           # check 9: the heads of this many layers (1: the check layer)


# The tolerances, and why: fp32 logits through the same maths in another module order agree to ~1e-5
# of their scale; an absolute 1e-4 is the matrix's tolerance on the tiny families, and scaled by the
# logits' size (max |logit|, at least 1) it holds for real models, whose logits are ~10-30.
TOLERANCES: dict[str, float] = {
    "logits": 1e-4, "left-pad": 1e-4, "left-pad gen": 0, "zero-head": 1e-4, "successor e(t)": 1e-4,
    "successor OV": 1e-4, "retrieval": 0, "Ships": 1e-4, "factual DLA": 1e-4,
}
# tolerance x max(1, max |logit|); e(t): x max(1, max |e(t)|)
SCALED = {"logits", "left-pad", "zero-head", "successor e(t)", "successor OV", "factual DLA"}


@dataclass
class Check:
    """One row of the table: `value` the worst deviation (or a count), `passed` None when skipped."""

    number: int
    name: str
    what: str
    value: float | None = None
    tolerance: float | None = None
    passed: bool | None = None
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DoctorResult:
    spec: str
    fingerprint: str
    architecture: str
    adapter: str
    copy: str
    supported: bool
    missing_component: str | None
    facts: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (on a busy machine, wall time says little)
    threads: int = 0
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # load / copy / checks: wall and CPU

    @property
    def ok(self) -> bool:
        return self.supported and all(c.passed is not False for c in self.checks) and \
            any(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "fingerprint": self.fingerprint, "architecture": self.architecture,
                "adapter": self.adapter, "copy": self.copy, "supported": self.supported,
                "missing_component": self.missing_component, "facts": self.facts, "ok": self.ok,
                "checks": [c.to_dict() for c in self.checks], "seconds": round(self.seconds, 2),
                "cpu_seconds": round(self.cpu_seconds, 2), "phases": self.phases,
                "threads": self.threads}


CHECKS: tuple[tuple[str, str], ...] = (
    ("logits", "bridge logits vs an independently loaded HF copy (fp32, eager), max |diff|"),
    ("left-pad", "left-padded batch vs each row alone, last-position logits, max |diff|"),
    ("left-pad gen", "greedy_generate on a left-padded batch vs each row alone, rows differing"),
    ("zero-head", "zero-ablating each query head of one layer vs zeroing its o-projection input slice in the copy"),
    ("successor e(t)", "e(t) from the architecture layer vs the model's own block 0 (hooks), max |diff|"),
    ("successor OV", "each head's OV logits (one layer) vs the model's own attention on e(t), max |diff|"),
    ("retrieval", "fast path vs full-forward reference: argmax keys differing (answers must match)"),
    ("Ships", "batched query-level Ships vs one forward per ablated head, max |KL diff|"),
    ("factual DLA", "all-heads direct logit attribution vs direct-path removal per head, max |diff|"),
)


# ---- the independent copy ---------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' load-time warnings and progress bars say nothing a doctor user needs."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()


def _source_of(spec: str) -> tuple[str, str | None] | None:
    """(folder or hub id, gguf file name) the spec's weights are read from; None without files."""
    if spec in SPECS and SPECS[spec].asset is not None:
        path = assets.asset_file(SPECS[spec].asset)
        return str(path.parent), SPECS[spec].gguf_file
    if spec.startswith("hf:"):
        return spec[3:], None
    if spec.startswith("gguf:"):
        path = Path(spec[5:]).expanduser()
        return str(path.parent), path.name
    return None


def independent_copy(model: LoadedModel) -> tuple[torch.nn.Module, str]:
    """A Hugging Face copy of the model's weights that the bridge never touched (fp32, eager
    attention), and how it was made."""
    import transformers

    source = _source_of(model.spec)
    with _quiet(), contextlib.redirect_stderr(io.StringIO()):  # GGUF de-quantisation draws its own bar
        if source is not None:
            folder, gguf = source
            kwargs = {"gguf_file": gguf} if gguf else {}
            copy = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                     attn_implementation="eager", **kwargs)
            how = f"reloaded from {folder}" + (f"/{gguf}" if gguf else "")
        else:
            config = model.hf_model.config
            copy = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                                 attn_implementation="eager")
            # the bridged model's state dict names its HF modules with `_original_component.` inserted
            state = {name.replace("_original_component.", ""): value
                     for name, value in model.hf_model.state_dict().items()}
            missing = copy.load_state_dict(state, strict=False).missing_keys
            tied = {name for name, _ in copy.named_parameters(remove_duplicate=True)}
            missing = [m for m in missing if m in tied]
            if missing:
                raise DoctorError(f"{model.spec}: cannot rebuild an independent copy ({len(missing)} weights not "
                                  f"found, e.g. {missing[0]}).")
            how = "a fresh HF module tree with a copy of the loaded weights (the spec has no files)"
    return copy.to(model.device).eval(), how


# ---- shared check helpers ---------------------------------------------------------------------------

def left_padded(model: LoadedModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Ids and mask of a left-padded batch of `texts`, and each row's own ids."""
    rows = [model.encode(t)[0] for t in texts]
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    pad = model.tokenizer.eos_token_id if pad is None else pad
    ids = torch.full((len(rows), width), 0 if pad is None else pad, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask, rows


def one_token_run(model: LoadedModel, ids: Sequence[int], hooks: Sequence[tuple[str, Any]],
                  keep: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each token alone as a one-token context (a batch `[n, 1]`) through the bridge with `hooks`; the
    values of the hook points in `keep`. Learned positions are zeroed (e(t) has none)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = tensor[:, 0].detach().float().clone()

    extra = [("hook_pos_embed", lambda t, hook: torch.zeros_like(t))] \
        if architecture(model).has_learned_positions and "hook_pos_embed" in model.bridge.hook_dict else []
    with torch.no_grad():
        model.run_with_hooks(torch.tensor(list(ids), device=model.device)[:, None],
                             fwd_hooks=[*extra, *hooks, *[(k, grab) for k in keep]])
    canonical = {k: model.bridge.hook_dict[k].name for k in keep}
    return {k: seen[canonical[k]] for k in keep}


def successor_ids(model: LoadedModel, n: int) -> list[int]:
    from analyses.data.succession import build_tasks

    ids = [i for task in build_tasks(model.tokenizer, number_max=20).tasks for i in task.token_ids]
    return list(dict.fromkeys(ids))[:n]


def spread_layers(model: LoadedModel, n: int, layer: int) -> list[int]:
    """`layer` alone (n = 1), or `n` layers spread from the first to the last."""
    if n >= model.n_layers:
        return list(range(model.n_layers))
    if n <= 1:
        return [layer]
    return sorted({round(i * (model.n_layers - 1) / (n - 1)) for i in range(n)})


@dataclass
class Context:
    model: LoadedModel
    copy: torch.nn.Module
    size: DoctorSize
    layer: int
    scale: float = 1.0  # max |logit| of the clean text (tolerances of the SCALED checks)
    sizes: dict[str, float] = field(default_factory=dict)  # a check's own scale, where not the logits'


@contextlib.contextmanager
def bridge_only(model: LoadedModel) -> Iterator[None]:
    """`model.logits` through the bridge's hooks for the block, not the fused path it may route to
    (probe.models `fused_routing`); held under the model's lock, so no other thread sees the switch."""
    with model.lock:
        old = getattr(model, "fused_routing", None)
        if old is not None:
            model.fused_routing = False
        try:
            yield
        finally:
            if old is not None:
                model.fused_routing = old


ROUTES: tuple[str, ...] = ("bridge", "default route")  # `model.logits` forced through the bridge, and as routed


@contextlib.contextmanager
def route(model: LoadedModel, name: str) -> Iterator[None]:
    with bridge_only(model) if name == "bridge" else contextlib.nullcontext():
        yield


def check_logits(ctx: Context) -> tuple[float, str]:
    ids = ctx.model.encode(TEXT)
    diffs = {}
    with torch.no_grad():
        theirs = ctx.copy(ids).logits.float()
        for name in ROUTES:
            with route(ctx.model, name):
                diffs[name] = float((ctx.model.logits(ids).float() - theirs).abs().max())
    ctx.scale = max(1.0, float(theirs.abs().max()))
    per_route = ", ".join(f"{name} {value:.2g}" for name, value in diffs.items())
    return max(diffs.values()), f"{ids.shape[-1]} tokens, max |logit| {ctx.scale:.3g}; {per_route}"


def check_left_pad(ctx: Context) -> tuple[float, str]:
    model = ctx.model
    ids, mask, rows = left_padded(model, ROWS)
    with torch.no_grad(), model.lock:
        batched = model.bridge(ids, attention_mask=mask)[:, -1].float()
        worst = max(float((batched[i] - model.logits(row[None])[0, -1].float()).abs().max())
                    for i, row in enumerate(rows))
    return worst, f"{len(rows)} rows, widths {[len(r) for r in rows]}"


def check_left_pad_generation(ctx: Context) -> tuple[float, str]:
    model, n = ctx.model, ctx.size.generate_tokens
    batched = greedy_generate(model, list(ROWS), n, add_special_tokens=True, stop_ids=())
    alone = [greedy_generate(model, [t], n, add_special_tokens=True, stop_ids=())[0] for t in ROWS]
    differing = sum(a != b for a, b in zip(batched, alone))
    return float(differing), f"{len(ROWS)} rows x {n} new tokens"


def check_zero_head(ctx: Context) -> tuple[float, str]:
    model, copy, layer = ctx.model, ctx.copy, ctx.layer
    arch = architecture(model)
    ids = model.encode(TEXT)
    dh = model.d_head
    projection = copy.get_submodule(arch.attention(layer).o_path)
    worst, moved = 0.0, float("inf")
    per_route = dict.fromkeys(ROUTES, 0.0)
    with torch.no_grad():
        clean = copy(ids).logits.float()
        for head in range(model.n_heads):
            ablated = {}
            for name in ROUTES:
                with route(model, name), intervene(model, [zero_ablation([Head(layer, head)])]):
                    ablated[name] = model.logits(ids).float()

            def zero_slice(module: Any, args: tuple[torch.Tensor, ...], head: int = head) -> tuple[torch.Tensor, ...]:
                z = args[0].clone()
                z[..., head * dh:(head + 1) * dh] = 0
                return (z, *args[1:])

            handle = projection.register_forward_pre_hook(zero_slice)
            try:
                expected = copy(ids).logits.float()
            finally:
                handle.remove()
            for name in ROUTES:
                per_route[name] = max(per_route[name], float((ablated[name] - expected).abs().max()))
            worst = max(per_route.values())
            moved = min(moved, float((expected - clean).abs().max()))
    if moved <= MOVED:
        raise _Failed(worst, f"a head's ablation moved the copy's logits by only {moved:.2g} (≤ {MOVED:g}): "
                             "nothing to compare")
    routes = ", ".join(f"{name} {value:.2g}" for name, value in per_route.items())
    return worst, f"layer {layer}, {model.n_heads} query heads; smallest move {moved:.3g}; {routes}"


def check_successor_embedding(ctx: Context) -> tuple[float, str]:
    from analyses import successor

    model = ctx.model
    ids = successor_ids(model, ctx.size.successor_tokens)
    full = successor.effective_embeddings(model, ids, include_residual=True, include_attn0=True)
    mlp0 = successor.effective_embeddings(model, ids)
    got = one_token_run(model, ids, [], ["blocks.0.hook_resid_post"])
    worst = float((full - got["blocks.0.hook_resid_post"]).abs().max())
    zeroed = one_token_run(model, ids, [("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))],
                           ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])
    delta = zeroed["blocks.0.hook_resid_post"] - zeroed["blocks.0.hook_resid_pre"]
    worst = max(worst, float((mlp0 - delta).abs().max()))
    ctx.sizes["successor e(t)"] = max(1.0, float(full.abs().max()))
    return worst, f"{len(ids)} tokens, |e(t)| up to {float(full.abs().max()):.3g}"


def check_successor_ov(ctx: Context) -> tuple[float, str]:
    from analyses import successor

    model, copy, layer = ctx.model, ctx.copy, ctx.layer
    arch = architecture(model)
    ids = successor_ids(model, ctx.size.successor_tokens)
    E = successor.effective_embeddings(model, ids)
    fast = successor.ov_logits(successor.build_circuit(model), E, ids, "module", include_biases=True)
    final = copy.get_submodule(arch.path("ln_final"))
    unembedding = copy.get_submodule(arch.path("unembed")).weight
    columns = unembedding[torch.tensor(ids, device=unembedding.device)].T.float()

    def put(t: torch.Tensor, hook: Any) -> torch.Tensor:
        return E[:, None].to(t.dtype)

    outputs = {}
    for keep in [None, *range(model.n_heads)]:
        def only(z: torch.Tensor, hook: Any, keep: int | None = keep) -> torch.Tensor:
            mask = torch.zeros(z.shape[-2], 1, dtype=z.dtype, device=z.device)
            if keep is not None:
                mask[keep] = 1
            return z * mask

        name = f"blocks.{layer}.hook_attn_out"
        hooks = [(f"blocks.{layer}.hook_resid_pre", put), (f"blocks.{layer}.attn.hook_z", only)]
        outputs[keep] = one_token_run(model, ids, hooks, [name])[name]
    worst = 0.0
    with torch.no_grad():
        for head in range(model.n_heads):
            logits = final(outputs[head] - outputs[None]).float() @ columns
            worst = max(worst, float((fast[layer, head] - logits).abs().max()))
    return worst, f"layer {layer}, {model.n_heads} heads x {len(ids)} tokens"


def retrieval_sample(model: LoadedModel, text: str = RETRIEVAL_TEXT) -> Any:
    """A NIAH sample carrying this model's ids of `text`, answer span inside it (no real needle)."""
    from analyses.data.haystack import Needle, NiahSample

    ids = tuple(int(i) for i in model.encode(text)[0].tolist())
    span = (min(3, len(ids) - 1), min(8, len(ids)))
    needle = Needle(fact=text, question="", answer="")
    return NiahSample(needle_index=-1, needle=needle, template="base", context_length=len(ids), depth=50.0,
                      prompt=text, input_ids=ids, context_tokens=len(ids), actual_depth=0.5,
                      needle_chars=(0, len(text)), answer_chars=(0, 0), needle_tokens=span, answer_tokens=span)


def check_retrieval(ctx: Context) -> tuple[float, str]:
    from analyses import retrieval

    model, n = ctx.model, ctx.size.generate_tokens
    sample = retrieval_sample(model)
    fast = retrieval.fast_sample(model, sample, n, stop=False)
    slow = retrieval.reference_sample(model, sample, n, stop=False)
    if fast.answer_ids != slow.answer_ids:
        raise _Failed(float("inf"), f"answers differ: fast {fast.answer_ids}, reference {slow.answer_ids}")
    mismatched = int((fast.argmax != slow.argmax).sum())
    if not (torch.equal(fast.events, slow.events) and torch.equal(fast.unique, slow.unique)):
        mismatched = max(mismatched, 1)
    return float(mismatched), f"{sample.prompt_len} tokens, {len(fast.answer_ids)} steps x {model.n_layers * model.n_heads} heads"


def check_ships(ctx: Context) -> tuple[float, str]:
    from analyses import safety

    model = ctx.model
    layers = spread_layers(model, ctx.size.ships_layers, ctx.layer)
    heads = [Head(layer, h) for layer in layers for h in range(model.n_heads)]
    ids = model.encode("the capital of mary is the book of john")
    fast = safety.ships_query(model, ids, heads=heads)
    slow = safety.ships_query_reference(model, ids, heads=heads)
    index = (torch.tensor([h.layer for h in heads]), torch.tensor([h.head for h in heads]))
    fast, slow = fast[index], slow[index]
    if not float(slow.abs().max()) > KL_NOISE:
        raise _Inconclusive(float((fast - slow).abs().max()),
                            f"layers {layers}: the reference's ablations change the output by at most "
                            f"{float(slow.abs().max()):.2g} nats (float32 noise, <= {KL_NOISE:g}): the output does not "
                            "depend on these heads' attention patterns, so the paths cannot differ here")
    return float((fast - slow).abs().max()), f"layers {layers}: {len(heads)} heads, KL up to {float(slow.max()):.3g}"


def check_factual(ctx: Context) -> tuple[float, str]:
    from analyses import factual

    model = ctx.model

    def first(word: str) -> int:
        return int(model.encode(word, add_special_tokens=False)[0, 0])

    prompt = factual.CounterfactualPrompt("mary", ("book",), "key", FACTUAL_TEXT, first(" book"), first(" key"), False)
    attribution = factual.head_attribution(model, [prompt])
    if not float(attribution.per_prompt.abs().max()) > MOVED:
        raise _Inconclusive(0.0, f"every head's attribution is below {MOVED:g}: nothing to compare")
    layers = spread_layers(model, ctx.size.factual_layers, ctx.layer)
    heads = [Head(layer, h) for layer in layers for h in range(model.n_heads)]
    worst = max(abs(factual.reference_direct_effect(model, prompt, head)
                    - float(attribution.per_prompt[0, head.layer, head.head])) for head in heads)
    return worst, f"layers {layers}: {len(heads)} heads, |DLA| up to {float(attribution.per_prompt.abs().max()):.3g}"


class _Failed(Exception):
    """A check that cannot pass whatever its number (e.g. nothing moved); carries the number and why."""

    def __init__(self, value: float, why: str) -> None:
        super().__init__(why)
        self.value, self.why = value, why


class _Inconclusive(_Failed):
    """A check with nothing to compare on this model (e.g. its output ignores the heads' patterns): skipped,
    with the reason, rather than passed."""


RUNNERS: dict[str, Callable[[Context], tuple[float, str]]] = {
    "logits": check_logits, "left-pad": check_left_pad, "left-pad gen": check_left_pad_generation,
    "zero-head": check_zero_head, "successor e(t)": check_successor_embedding, "successor OV": check_successor_ov,
    "retrieval": check_retrieval, "Ships": check_ships, "factual DLA": check_factual,
}


# ---- the doctor -------------------------------------------------------------------------------------

def _adapter_name(model: LoadedModel) -> str:
    adapter = getattr(model.bridge, "adapter", None)
    return type(adapter).__name__ if adapter is not None else "?"


def _missing_component(error: ProbeError) -> str:
    return getattr(error, "component", None) or str(error)


def doctor(model: LoadedModel | str, size: DoctorSize = DoctorSize(), progress: Progress | None = None,
           device: str | None = None, only: Sequence[str] | None = None) -> DoctorResult:
    """Run the checks on `model` (a `LoadedModel` in float32, or a spec to load). `only` restricts to
    some check names (the app and tests); the result says per check its number, tolerance, pass/fail."""
    say = progress or (lambda message: None)
    start, cpu_start = time.perf_counter(), time.process_time()
    phases: dict[str, dict[str, float]] = {}

    def phase(name: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        phases[name] = {"seconds": round(now[0] - since[0], 2), "cpu_seconds": round(now[1] - since[1], 2)}
        return now

    mark = (start, cpu_start)
    if isinstance(model, str):
        say(f"loading {model}")
        model = load_model(model, device=device, dtype="float32", progress=say)
        mark = phase("load", mark)
    if model.dtype != torch.float32:
        raise DoctorError(f"doctor checks {model.spec} in float32 (its tolerances are fp32's); it is loaded in "
                          f"{str(model.dtype).replace('torch.', '')}: load it with dtype float32.")
    unknown = sorted(set(only or ()) - set(RUNNERS))
    if unknown:
        raise DoctorError(f"Unknown doctor check(s) {', '.join(unknown)}; known: {', '.join(RUNNERS)}.")
    result = DoctorResult(spec=model.spec, fingerprint=model.fingerprint, architecture=model.architecture,
                          adapter=_adapter_name(model), copy="", supported=True, missing_component=None,
                          facts={}, threads=torch.get_num_threads(), phases=phases)
    try:
        arch = architecture(model)
        result.facts = arch.summary()
    except ArchitectureError as error:  # MissingComponentError names the component
        result.supported = False
        result.missing_component = _missing_component(error) if isinstance(error, MissingComponentError) else str(error)
        result.checks = [Check(0, "architecture layer", "the architecture layer reads the family", passed=False,
                               detail=str(error))]
        result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return result
    say(f"{model.architecture} through {result.adapter}: loading an independent Hugging Face copy")
    copy, result.copy = independent_copy(model)
    mark = phase("copy", mark)
    layer = size.layer if size.layer is not None else model.n_layers // 2
    if not 0 <= layer < model.n_layers:
        raise DoctorError(f"Layer {layer} does not exist; {model.spec} has {model.n_layers} layers.")
    ctx = Context(model, copy, size, layer)
    for number, (name, what) in enumerate(CHECKS, start=1):
        if only and name not in only and name != "logits":  # logits sets the tolerance scale
            continue
        say(f"check {number}/{len(CHECKS)}: {name}")
        check = Check(number, name, what, tolerance=TOLERANCES[name])
        began = time.perf_counter()
        try:
            check.value, check.detail = RUNNERS[name](ctx)
            if name in SCALED:
                check.tolerance = TOLERANCES[name] * ctx.sizes.get(name, ctx.scale)
            check.passed = bool(check.value <= check.tolerance)
        except _Inconclusive as skipped:
            check.value, check.detail, check.passed = skipped.value, f"skipped: {skipped.why}", None
        except _Failed as failed:
            check.value, check.detail, check.passed = failed.value, failed.why, False
        except MissingComponentError as error:
            check.detail, check.passed = f"unsupported: {error}", False
        except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check, with its reason
            check.detail, check.passed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False
        check.seconds = time.perf_counter() - began
        result.checks.append(check)
        state = "skip" if check.passed is None else ("pass" if check.passed else "FAIL")
        say(f"check {number}/{len(CHECKS)}: {name}: {state} ({check.seconds:.1f} s)")
    phase("checks", mark)
    result.threads = torch.get_num_threads()
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    del copy
    return result


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:.0f}" if float(value).is_integer() and value < 1e6 else f"{value:.2e}"


def table_rows(result: DoctorResult) -> list[tuple[str, str, str, str, str, str]]:
    """(#, check, value, tolerance, pass/fail, detail) per check, for the CLI and the app."""
    rows = []
    for c in result.checks:
        state = "skip" if c.passed is None else ("pass" if c.passed else "FAIL")
        rows.append((str(c.number), c.name, format_value(c.value), format_value(c.tolerance), state, c.detail))
    return rows


def header_lines(result: DoctorResult) -> list[str]:
    lines = [f"{result.spec}: {result.architecture} through TransformerLens's {result.adapter}"]
    if result.supported:
        facts = result.facts
        lines.append("architecture layer: " + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "windows")
                     + (f", windows {sorted(set(map(str, facts['windows'])))}" if "windows" in facts else ""))
        lines.append(f"independent copy: {result.copy}")
    else:
        lines.append(f"unsupported: the architecture layer has no {result.missing_component}")
    return lines


DOCTOR_COLUMNS = ("#", "check", "value", "tolerance", "result", "detail")


def timing_line(result: DoctorResult) -> str:
    """Wall and CPU seconds per phase (load, independent copy, checks) and the threads used."""
    parts = [f"{name} {p['seconds']:.0f} s ({p['cpu_seconds']:.0f} s CPU)" for name, p in result.phases.items()]
    return (f"time: {result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU, {result.threads} thread"
            f"{'s' if result.threads > 1 else ''}" + (f"; {', '.join(parts)}" if parts else ""))
