"""The checks, one function each: the proof matrix's comparisons at a reduced size, each returning its
worst deviation (or a count) and a detail line; their names, tolerances and what each compares."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from analyses.doctor.context import Context, left_padded, one_token_run, spread_layers, successor_ids
from probe.architecture import architecture
from probe.generation import greedy_generate
from probe.heads import Head
from probe.interventions import intervene, zero_ablation
from probe.models import LoadedModel
from probe.routing import bridge_only


TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12", "a book")
RETRIEVAL_TEXT = " ".join(["the capital of mary is the book of john and the key to the park"] * 2)
FACTUAL_TEXT = "the capital of mary is the key . q: what is the capital of mary ? a:"
KL_NOISE = 1e-6  # nats: KLs this small between fp32 distributions are rounding (tiny random models)
MOVED = 1e-3  # an ablation that moves the logits less than this changed nothing (a hook that fires and does nothing)


# The tolerances, and why: fp32 logits through the same maths in another module order agree to ~1e-5
# of their scale; an absolute 1e-4 is the matrix's tolerance on the tiny families, and scaled by the
# logits' size (max |logit|, at least 1) it holds for real models, whose logits are ~10-30.
TOLERANCES: dict[str, float] = {
    "logits": 1e-4, "left-pad": 1e-4, "left-pad gen": 0, "zero-head": 1e-4, "successor e(t)": 1e-4,
    "successor OV": 1e-4, "retrieval": 0, "Ships": 1e-4, "factual DLA": 1e-4,
}
# tolerance x max(1, max |logit|); e(t): x max(1, max |e(t)|)
SCALED = {"logits", "left-pad", "zero-head", "successor e(t)", "successor OV", "factual DLA"}


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
