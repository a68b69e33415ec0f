"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574): heads that copy the needle while the answer is written.

A copy event of query head (l, h) at answer step t: the head's argmax attention key j* lies inside the
needle's answer span [s, e) and the prompt token there is the token being generated (`P[j*] == w_t`).
Scores per head (spec §2), both computed on every run:

- `events` (reference code): events over all answer steps / |answer span|; can exceed 1;
- `unique` (paper): distinct answer-span positions copied / |answer span|; at most 1.

Samples count only when the model actually retrieved the answer (ROUGE-1 recall of the answer phrase in
the response > 0.5, switchable), computed as the reference does, by `rouge_score` with Porter stemming
(`rouge_stem=False`: plain words; both recalls are kept per sample and `stem_changes()` counts the
verdicts stemming moves); ungated scores are kept for diagnosis (spec pitfall 11).

Fast path (why it is fast): one greedy generation with a KV cache; the prefill runs unhooked through
the HF model's own SDPA attention (no L x L scores at all); each decode step runs hooked and keeps,
per layer and head, only the argmax key of its own attention row (`hook_pattern` of the one new query:
`[H, N]`, already with the family's GQA expansion, scaling, soft-cap, QK-norm, partial rotary, causal and
sliding-window masks). Memory is linear in the context, never an L x L pattern, and nothing is
family-specific, so fused-qkv families (Phi-3, GPT-NeoX), whose bridge never fires `hook_rot_q`, run
too. `reference_sample` is the slow reference: no cache, a full forward per decode step, the argmax
read from the full `hook_pattern`. `answer_rows` (rows recomputed from rotated q/k with
`attention_geometry`, the architecture layer's facts) is kept for analyses that need whole rows.

Masking (spec §4): NIAH accuracy with the top-k heads masked vs k random heads drawn outside the top
list and outside every head above the retrieval threshold, as uniform attention (the reference's
masking) and as zero-ablation, on the answer rows only (from the last prompt token on, as the
reference's decode loop does). Held out by default, as in the paper (heads selected on some needles,
masking measured on another needle and haystack): detection on needles 0-2, masking on needles 3-5, at
the midpoints between the detection depths, on haystack stretches shifted by half the needle stride;
`result.split` records what each phase used, and a shared needle, depth or haystack sentence is an
`InSampleError` unless `allow_in_sample=True` (then labelled in-sample). All masking conditions of a
prompt share one unmasked prefill and decode together as rows of one batch.

Why a private decode loop rather than `probe.generation`: that one runs Hugging Face `generate` on
texts; the analysis needs, per decode step, each head's argmax over its own attention row with the
prefill unhooked (SDPA, no `[H, N, N]` patterns), and the masking conditions decode from one shared
prefill cache with per-row interventions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from analyses.common import Progress, no_progress, provenance, random_head_sets
from analyses.data.haystack import (
    NEEDLE_STRIDE,
    NeedleNotFoundError,
    NiahGrid,
    NiahSample,
    build_sample,
    haystack_sentences,
)
from analyses.data.needles import NEEDLES, Needle
from probe import batching
from probe.architecture import architecture
from probe.errors import ProbeError, PromptTooLongError
from probe.fused import FusedPathError, fused, kernel_pattern
from probe.heads import Head
from probe.interventions import Intervention, intervene, uniform_attention, zero_ablation
from probe.models import LoadedModel
from probe.parallel import map_items
from probe.results import HeadScores, Provenance, to_jsonable
from probe.runtime import large_blocks_mapped

ANALYZER = "retrieval"
VERSION = "2"  # 2: held-out masking split, stemmed ROUGE-1 gate, random pool outside every head above threshold
SCORE_MODES = ("events", "unique")
MATCH_MODES = ("id", "text")
MASK_KINDS = ("uniform", "zero")


class RetrievalError(ProbeError):
    """A retrieval-heads run that cannot be carried out as configured."""


class InSampleError(RetrievalError):
    """The masking grid shares needles, depths or haystack text with the detection grid (not held out)."""


class NoRetrievalError(RetrievalError):
    """No sample passed the ROUGE gate: there is nothing to score. `.result` holds the ungated run."""

    def __init__(self, message: str, result: RetrievalResult | None = None) -> None:
        super().__init__(message)
        self.result = result


# ---- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrievalConfig:
    """Every knob of a run. Lengths count haystack + needle tokens (the prompt adds the question)."""

    lengths: tuple[int, ...] = (512, 1024, 1536)
    depths: tuple[float, ...] = (0.0, 50.0, 100.0)
    needles: tuple[int, ...] = (0, 1, 2)
    template: str = "auto"  # auto (chat if the model has a chat template) | base | chat
    max_new_tokens: int = 24
    score_mode: str = "events"  # which score is the headline: events (reference code) | unique (paper)
    match: str = "id"  # copy test: id (token ids equal) | text (decoded, whitespace-stripped strings equal)
    rouge_gate: bool = True
    rouge_threshold: float = 0.5
    rouge_stem: bool = True  # Porter-stem words before ROUGE-1, as the reference's rouge_score(use_stemmer=True)
    threshold: float = 0.1
    haystack_stride: int = NEEDLE_STRIDE  # needle i's haystack starts at sentence i * stride (mod the haystack)
    # masking experiment (skipped when mask_ks is empty); held out from detection by default (paper: heads
    # are selected on some needles and masked on another needle and haystack)
    mask_ks: tuple[int, ...] = ()
    mask_kinds: tuple[str, ...] = MASK_KINDS
    mask_random_draws: int = 3
    mask_needles: tuple[int, ...] = (3, 4, 5)
    mask_lengths: tuple[int, ...] | None = None  # None: the detection lengths
    mask_depths: tuple[float, ...] | None = None  # None: midpoints between consecutive detection depths
    mask_offset: int | None = None  # masking needle i reads from i * stride + mask_offset; None: stride // 2
    allow_in_sample: bool = False  # let the masking grid share needles/depths/haystack with detection (labelled)
    mask_batch: int = 16  # masking conditions decoded together per batch
    seed: int = 0

    def masking_depths(self) -> tuple[float, ...]:
        """The masking depths: the configured ones, else the midpoints between the detection depths
        (never a depth used for detection)."""
        if self.mask_depths is not None:
            return tuple(float(d) for d in self.mask_depths)
        ordered = sorted({float(d) for d in self.depths})
        if len(ordered) < 2:
            raise RetrievalError("Held-out masking depths are the midpoints between detection depths: give at "
                                 "least two detection depths, or mask_depths explicitly.")
        return tuple((a + b) / 2 for a, b in zip(ordered, ordered[1:]))

    def masking_offset(self) -> int:
        return self.haystack_stride // 2 if self.mask_offset is None else int(self.mask_offset)

    def validate(self) -> None:
        if self.score_mode not in SCORE_MODES:
            raise RetrievalError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}.")
        if self.match not in MATCH_MODES:
            raise RetrievalError(f"match must be one of {MATCH_MODES}, got {self.match!r}.")
        if self.template not in ("auto", "base", "chat"):
            raise RetrievalError(f"template must be auto, base or chat, got {self.template!r}.")
        bad = [k for k in self.mask_kinds if k not in MASK_KINDS]
        if bad:
            raise RetrievalError(f"Unknown mask kinds {bad}; choose from {MASK_KINDS}.")
        if any(k <= 0 for k in self.mask_ks):
            raise RetrievalError("mask_ks must be positive head counts.")
        if not self.lengths or not self.depths or not self.needles:
            raise RetrievalError("The grid needs at least one length, one depth and one needle.")
        if self.max_new_tokens < 1:
            raise RetrievalError("max_new_tokens must be at least 1.")
        if self.haystack_stride < 0:
            raise RetrievalError("haystack_stride must be >= 0.")
        if self.mask_ks and not self.mask_needles:
            raise RetrievalError("The masking experiment needs at least one needle (mask_needles).")


# quick preset (spec §8): 3 lengths <= 1,536 x 3 depths x 3 needles = 27 samples
QUICK = RetrievalConfig()
DEFAULT = RetrievalConfig(lengths=(512, 1024, 1536, 2048, 3072, 4096), depths=(0.0, 25.0, 50.0, 75.0, 100.0))


def resolve_template(model: LoadedModel, template: str) -> str:
    if template == "auto":
        return "chat" if model.chat_template else "base"
    if template == "chat" and not model.chat_template:
        raise RetrievalError(f"{model.spec} has no chat template; use template='base'.")
    return template


# ---- the ROUGE-1 success gate ------------------------------------------------------------------------

_SCORERS: dict[bool, Any] = {}


def rouge1(reference: str, response: str, stem: bool = True) -> float:
    """ROUGE-1 recall of `reference`'s words in `response`, by Google's `rouge_score` package, which the
    reference code calls (`RougeScorer(['rouge1', ...], use_stemmer=True)`): lowercased alphanumeric words,
    clipped counts, and with `stem` nltk's Porter stemmer on words longer than 3 letters ("painting" and
    "paints" both match "paint"). `stem=False` is the plain word match (`haystack.rouge1_recall`)."""
    if not reference.strip():
        raise RetrievalError("ROUGE-1 recall needs a non-empty reference.")
    if stem not in _SCORERS:
        try:
            from rouge_score import rouge_scorer
        except ImportError as error:  # a dependency of the project: only a broken install lacks it
            raise RetrievalError("The ROUGE-1 gate needs the `rouge-score` package: pip install rouge-score") from error
        _SCORERS[stem] = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)
    return float(_SCORERS[stem].score(reference, response)["rouge1"].recall)


# ---- attention geometry --------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerGeometry:
    """What the model does between q.k and softmax in one layer (read from the HF attention module)."""

    scaling: float
    softcap: float | None
    window: int | None  # sliding window: key k visible from query q iff q - k < window


def attention_geometry(model: LoadedModel) -> list[LayerGeometry]:
    """Per-layer scaling, soft-capping and sliding window, as the bridge's attention uses them
    (from the architecture layer, `probe.architecture`)."""
    arch = architecture(model)
    return [LayerGeometry(a.scaling, a.softcap, a.window)
            for a in (arch.attention(layer) for layer in range(model.n_layers))]


def answer_rows(queries: torch.Tensor, keys: torch.Tensor, first_position: int, geometry: LayerGeometry,
                group_size: int) -> torch.Tensor:
    """Attention weights `[n_heads, T, N]` of T consecutive query rows, from rotated q/k alone.

    `queries` `[T, n_heads, d]` sit at positions first_position .. first_position+T-1; `keys`
    `[N, n_kv, d]` at positions 0..N-1 (N >= first_position + T). Same operations and order as the
    bridge: matmul, x scaling, soft-cap, mask, float32 softmax.
    """
    n_rows, n_keys = queries.shape[0], keys.shape[0]
    q = queries.transpose(0, 1)  # [H, T, d]
    k = keys.transpose(0, 1).repeat_interleave(group_size, dim=0)  # [H, N, d]
    scores = torch.matmul(q, k.transpose(-2, -1)) * geometry.scaling
    if geometry.softcap is not None:
        scores = torch.tanh(scores / geometry.softcap) * geometry.softcap
    rows = torch.arange(first_position, first_position + n_rows, device=scores.device)[:, None]
    cols = torch.arange(n_keys, device=scores.device)[None, :]
    visible = cols <= rows
    if geometry.window is not None:
        visible = visible & (rows - cols < geometry.window)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


# ---- per-sample scoring ---------------------------------------------------------------------------

@dataclass
class SampleTrace:
    """One sample's greedy answer and, per head, its copy events (answer steps where it copied)."""

    answer_ids: list[int]
    response: str
    events: torch.Tensor  # [L, H] number of copy events
    unique: torch.Tensor  # [L, H] distinct answer-span positions copied
    argmax: torch.Tensor  # [L, H, T] argmax key position per answer step


class _TokenText:
    """Decoded, whitespace-stripped token strings (for `match='text'`), cached per id."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.cache = model, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.model.tokenizer.decode([token]).strip()
        return self.cache[token]


def _copy_counts(argmax: torch.Tensor, prompt_ids: Sequence[int], answer: Sequence[int], span: tuple[int, int],
                 match: str, text: _TokenText | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Events and unique copied positions per head from the argmax keys `[L, H, T]`."""
    n_layers, n_heads, n_steps = argmax.shape
    start, stop = span
    inside = (argmax >= start) & (argmax < stop)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long)
    clipped = argmax.clamp(max=len(ids) - 1)
    copied_ids = ids[clipped]
    generated = torch.tensor(list(answer)[:n_steps], dtype=torch.long)
    if match == "id":
        same = copied_ids == generated.view(1, 1, -1)
    else:
        if text is None:
            raise RetrievalError("match='text' needs the token decoder.")
        same = torch.zeros_like(inside)
        for index in inside.nonzero().tolist():
            layer, head, step = index
            word = text(int(generated[step]))
            same[layer, head, step] = bool(word) and text(int(copied_ids[layer, head, step])) == word
    event = inside & same
    events = event.sum(-1)
    unique = torch.zeros(n_layers, n_heads, dtype=torch.long)
    for layer, head in (events > 0).nonzero().tolist():
        unique[layer, head] = len(set(argmax[layer, head][event[layer, head]].tolist()))
    return events, unique


def _stop_ids(model: LoadedModel) -> set[int]:
    stops = set(model.tokenizer.all_special_ids or ())
    if model.tokenizer.eos_token_id is not None:
        stops.add(int(model.tokenizer.eos_token_id))
    return stops


def _is_stop(model: LoadedModel, token: int, stops: set[int]) -> bool:
    """The reference stops at a newline; we also stop at end-of-turn/special tokens."""
    return token in stops or "\n" in model.tokenizer.decode([token])


@torch.no_grad()
def fast_sample(model: LoadedModel, sample: NiahSample, max_new_tokens: int, match: str = "id",
                geometry: list[LayerGeometry] | None = None, stop: bool = True) -> SampleTrace:
    """Greedy answer + copy events from each decode step's own attention row.

    The prefill of `prompt[:-1]` runs with no hooks and, where the model allows it, through the HF
    attention modules with SDPA (`_native_attention`): no `[H, N, N]` score tensor, so it costs about
    one linear-memory forward; its keys and values go into a full `DynamicCache`. Only the decode steps
    run hooked: each keeps the argmax key of every head's row of `hook_pattern` (`[H]` per layer and
    step), the very quantity the reference reads from full forwards. `geometry` is accepted for
    compatibility and not needed. `stop=False` decodes exactly `max_new_tokens` (benchmarks on random
    weights)."""
    architecture(model)  # a family without attention (state-space models) is a clear MissingComponentError
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    rows: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]

    def keep_argmax(pattern: torch.Tensor, hook: Any) -> None:
        rows[int(hook.name.split(".")[1])].append(pattern[0, :, -1, :].argmax(-1).cpu())

    def observe(layer: int) -> Any:
        def keep(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
            rows[layer].append(kernel_pattern(query[:, :, -1:], key, mask, kwargs)[0, :, -1, :].argmax(-1).cpu())
        return keep

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep_argmax) for layer in range(model.n_layers)]
    stops = _stop_ids(model)

    def decode(cache: Any) -> list[int]:
        answer: list[int] = []
        token = ids[:, -1:]
        for _ in range(max_new_tokens):
            out = model.hf_model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_id = int(out.logits[0, -1].argmax())
            if stop and _is_stop(model, next_id, stops):
                break
            answer.append(next_id)
            if len(answer) == max_new_tokens:
                break  # the row that would predict one more token is not needed
            token = torch.tensor([[next_id]], device=model.device)
        return answer

    def prefilled() -> Any:
        cache = _new_cache(model)
        if n > 1:
            with _native_attention(model):
                model.hf_model(ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    with model.lock:
        answer = None
        if model.fused_reason() is None:  # each step's attention row from the kernel's own q and k (no pattern)
            cache = prefilled()
            try:
                with fused(model, observers={layer: observe(layer) for layer in range(model.n_layers)}):
                    answer = decode(cache)
            except FusedPathError:  # this family does not call its kernel through transformers' registry
                for layer_rows in rows:
                    layer_rows.clear()
        if answer is None:
            cache = prefilled()
            with model.bridge.hooks(fwd_hooks=hooks):
                answer = decode(cache)
    n_steps = len(answer)
    argmax = torch.zeros(model.n_layers, model.n_heads, n_steps, dtype=torch.long)
    if n_steps:
        for layer in range(model.n_layers):
            if len(rows[layer]) < n_steps:
                raise RetrievalError(f"{model.spec}: layer {layer}'s attention pattern hook fired "
                                     f"{len(rows[layer])} times in {n_steps} decode steps; the bridge does not "
                                     "expose this family's attention weights.")
            argmax[layer] = torch.stack(rows[layer][:n_steps], dim=-1)
    text = _TokenText(model) if match == "text" else None
    events, unique = _copy_counts(argmax, sample.input_ids, answer, sample.answer_tokens, match, text)
    return SampleTrace(answer, model.decode(answer), events, unique, argmax)


def _cached_keys(cache: Any, layer: int) -> torch.Tensor:
    """One layer's keys `[N, n_kv, d]` from a full `DynamicCache` of batch 1 (stored `[1, n_kv, N, d]`)."""
    return cache.layers[layer].keys[0].transpose(0, 1)


@contextlib.contextmanager
def _native_attention(model: LoadedModel, implementation: str = "sdpa") -> Iterator[bool]:
    """For forwards that need no attention hooks: each decoder layer calls the HF attention module the
    bridge wraps, with `implementation` (SDPA), instead of the bridge's eager re-implementation, which
    materialises every layer's `[H, N, N]` scores (quadratic time and memory at long prompts).

    Swaps the bridge's attention modules out of their parent layers and sets the config's attention
    implementation, under `model.lock`, and restores both on exit (also on error), so other users of the
    bridge never see the change. Yields False and changes nothing where the swap is not well defined
    (a model without SDPA support, an attention module without `layer_idx`, output_attentions on) or
    would skip someone's hooks (a hook on any HookPoint of the bridge's attention, e.g. an intervention)."""
    from transformer_lens.hook_points import HookPoint

    with model.lock:
        hf_model = model.hf_model
        bridges = {id(block.attn): block.attn for block in model.bridge.blocks}
        originals = {key: getattr(attn, "original_component", None) for key, attn in bridges.items()}
        # the HF layers' own slots (the bridge's blocks also list the attention as a child, unused on forward)
        slots = [(parent, name, child) for parent in hf_model.modules()
                 if not type(parent).__module__.startswith("transformer_lens")
                 for name, child in parent._modules.items() if child is not None and id(child) in bridges]
        configs = {id(config): config for config in
                   [hf_model.config] + [getattr(o, "config", None) for o in originals.values()] if config is not None}
        possible = (bool(getattr(hf_model, "_supports_sdpa", False))
                    and len(slots) == len(bridges) == model.n_layers
                    and all(o is not None and getattr(o, "layer_idx", None) is not None for o in originals.values())
                    and not any(getattr(config, "output_attentions", False) for config in configs.values())
                    # hooks someone attached (interventions) must keep firing: then the bridge's attention runs
                    and not any(isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks)
                                for attn in bridges.values() for module in attn.modules()))
        if not possible:
            yield False
            return
        previous = {key: config._attn_implementation_internal for key, config in configs.items()}
        try:
            for config in configs.values():
                config._attn_implementation_internal = implementation
            for parent, name, child in slots:
                parent._modules[name] = originals[id(child)]
            yield True
        finally:
            for parent, name, child in slots:
                parent._modules[name] = child
            for key, config in configs.items():
                config._attn_implementation_internal = previous[key]


def _new_cache(model: LoadedModel) -> Any:
    """A cache that keeps every position in every layer.

    Not the config's sliding-window cache: that one truncates keys to the window, and the core's
    position-window interventions (`start=`) read absolute positions from the key length, so on
    Gemma's sliding layers masking from the answer on would silently do nothing."""
    from probe.generation import growing_cache

    return growing_cache()


@torch.no_grad()
def reference_sample(model: LoadedModel, sample: NiahSample, max_new_tokens: int, match: str = "id",
                     stop: bool = True) -> SampleTrace:
    """Slow reference: no KV cache, one full forward per decode step; at each step the argmax of the
    last row of every layer's full `hook_pattern` (the model's own attention weights)."""
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    rows: dict[int, torch.Tensor] = {}

    def keep_last_row(pattern: torch.Tensor, hook: Any) -> None:
        rows[int(hook.name.split(".")[1])] = pattern[0, :, -1, :].argmax(-1).cpu()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep_last_row) for layer in range(model.n_layers)]
    stops = _stop_ids(model)
    answer: list[int] = []
    steps: list[torch.Tensor] = []
    sequence = ids
    for _ in range(max_new_tokens):
        with model.bridge.hooks(fwd_hooks=hooks):  # full forward, full patterns; logits of the last row only
            logits = model.hf_model(sequence, use_cache=False, logits_to_keep=1).logits
        next_id = int(logits[0, -1].argmax())
        if stop and _is_stop(model, next_id, stops):
            break
        answer.append(next_id)
        steps.append(torch.stack([rows[layer] for layer in range(model.n_layers)]))
        if len(answer) == max_new_tokens:
            break
        sequence = torch.cat([sequence, torch.tensor([[next_id]], device=model.device)], dim=1)
    argmax = (torch.stack(steps, dim=-1) if steps
              else torch.zeros(model.n_layers, model.n_heads, 0, dtype=torch.long))
    text = _TokenText(model) if match == "text" else None
    events, unique = _copy_counts(argmax, sample.input_ids, answer, sample.answer_tokens, match, text)
    return SampleTrace(answer, model.decode(answer), events, unique, argmax)


# ---- result --------------------------------------------------------------------------------------

@dataclass
class MaskingResult:
    """NIAH ROUGE-1 recall per prompt under each masking condition.

    `conditions[i]` = {kind, selection ('none'|'top'|'random'), k, draw, heads}; `recall[i][j]` is the
    recall on prompt j (`prompts[j]`) under condition i.
    """

    conditions: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    recall: list[list[float]]
    responses: list[list[str]]
    seconds: float = 0.0
    stemmed: bool = True  # `recall` with Porter stemming (the reference); `recall_other` without (or vice versa)
    recall_other: list[list[float]] | None = None
    excluded: list[str] | None = None  # heads no random set could contain (top list + all above threshold)
    skipped: list[dict[str, Any]] | None = None  # masking prompts whose needle could not be located
    rouge_threshold: float = 0.5

    def stem_changes(self) -> dict[str, int]:
        """How many (condition, prompt) answers change between stemmed and unstemmed ROUGE-1: in recall,
        and in the success verdict (recall > threshold)."""
        if self.recall_other is None:
            return {"answers": 0, "recall_changed": 0, "verdict_changed": 0}
        pairs = [(a, b) for mine, theirs in zip(self.recall, self.recall_other) for a, b in zip(mine, theirs)]
        t = self.rouge_threshold
        return {"answers": len(pairs), "recall_changed": sum(abs(a - b) > 1e-12 for a, b in pairs),
                "verdict_changed": sum((a > t) != (b > t) for a, b in pairs)}

    def accuracy(self, index: int) -> float:
        values = self.recall[index]
        return float(sum(values) / len(values)) if values else float("nan")

    def find(self, kind: str, selection: str, k: int) -> list[int]:
        return [i for i, c in enumerate(self.conditions)
                if c["selection"] == selection and (selection == "none" or (c["kind"] == kind and c["k"] == k))]

    def table(self) -> list[dict[str, Any]]:
        """One row per (kind, k): accuracy with the top heads, every random draw, and no masking."""
        base = self.accuracy(self.find("", "none", 0)[0])
        rows = []
        kinds = sorted({c["kind"] for c in self.conditions if c["selection"] != "none"})
        ks = sorted({c["k"] for c in self.conditions if c["selection"] != "none"})
        for kind in kinds:
            for k in ks:
                top = [self.accuracy(i) for i in self.find(kind, "top", k)]
                random_acc = [self.accuracy(i) for i in self.find(kind, "random", k)]
                if not top:
                    continue
                rows.append({"kind": kind, "k": k, "none": base, "top": top[0], "random": random_acc,
                             "random_mean": sum(random_acc) / len(random_acc) if random_acc else float("nan")})
        return rows

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MaskingResult:
        return cls(**data)


@dataclass
class RetrievalResult:
    """Scores (headline: config.score_mode, gated), both variants gated and ungated, per-sample detail."""

    scores: HeadScores
    variants: dict[str, HeadScores]  # events, unique, events_ungated, unique_ungated
    per_sample: dict[str, torch.Tensor]  # events|unique -> [S, L, H], already divided by |answer span|
    samples: list[dict[str, Any]]  # summary + response + rouge + retained + distance
    skipped: list[dict[str, Any]]
    config: dict[str, Any]
    template: str
    group_size: int
    n_kv_heads: int
    provenance: Provenance
    masking: MaskingResult | None = None
    seconds: float = 0.0
    split: dict[str, Any] | None = None  # masking vs detection grid: needles/depths/haystack each used, overlap

    @property
    def attempted(self) -> int:
        return len(self.samples) + len(self.skipped)

    @property
    def retained(self) -> int:
        return sum(1 for s in self.samples if s["retained"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def retrieval_heads(self) -> list[tuple[Head, float]]:
        return self.scores.above(self.threshold)

    def stem_changes(self) -> dict[str, Any]:
        """Detection samples whose ROUGE-1 success verdict differs between stemmed and unstemmed words
        (the gate decides which samples are scored), with their labels."""
        t = float(self.config.get("rouge_threshold", 0.5))
        changed = [s for s in self.samples if "rouge1_recall_stemmed" in s
                   and (s["rouge1_recall_stemmed"] > t) != (s["rouge1_recall_unstemmed"] > t)]
        return {"samples": len(self.samples), "verdict_changed": len(changed),
                "pass_only_stemmed": sum(s["rouge1_recall_stemmed"] > t for s in changed),
                "changed": [f"needle {s['needle_index']}, {s['context_length']} tokens, depth {s['depth']:g}%"
                            for s in changed]}

    def kv_scores(self, how: str = "max") -> torch.Tensor:
        """Headline scores per KV group `[L, n_kv]`: max or mean over the group's query heads."""
        grouped = self.scores.scores.view(self.scores.n_layers, self.n_kv_heads, self.group_size)
        if how == "max":
            return grouped.max(-1).values
        if how == "mean":
            return grouped.mean(-1)
        raise RetrievalError(f"KV aggregation must be max or mean, got {how!r}.")

    def split_by_distance(self, window: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Headline per-head means over retained samples whose needle ends < window / >= window tokens
        before the first answer row (Gemma 3: only global layers see past the 512-token window)."""
        mode = self.config["score_mode"]
        parts: dict[str, tuple[torch.Tensor, int]] = {}
        for name, test in (("near", lambda d: d < window), ("far", lambda d: d >= window)):
            picked = [i for i, s in enumerate(self.samples) if s["retained"] and test(s["needle_distance"])]
            values = (self.per_sample[mode][picked].mean(0) if picked
                      else torch.full(self.scores.scores.shape, float("nan"), dtype=torch.float64))
            parts[name] = (values, len(picked))
        return parts

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores.to_json(),
            "variants": {k: v.to_json() for k, v in self.variants.items()},
            "per_sample": {k: to_jsonable(v.to(torch.float64)) for k, v in self.per_sample.items()},
            "samples": to_jsonable(self.samples), "skipped": to_jsonable(self.skipped),
            "config": to_jsonable(self.config), "template": self.template, "group_size": self.group_size,
            "n_kv_heads": self.n_kv_heads, "provenance": to_jsonable(self.provenance),
            "masking": self.masking.to_json() if self.masking else None, "seconds": self.seconds,
            "split": to_jsonable(self.split), "stem_changes": to_jsonable(self.stem_changes()),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrievalResult:
        return cls(
            scores=HeadScores.from_json(data["scores"]),
            variants={k: HeadScores.from_json(v) for k, v in data["variants"].items()},
            per_sample={k: torch.tensor(v, dtype=torch.float64) for k, v in data["per_sample"].items()},
            samples=data["samples"], skipped=data["skipped"], config=data["config"], template=data["template"],
            group_size=data["group_size"], n_kv_heads=data["n_kv_heads"],
            provenance=Provenance.from_json(data["provenance"]),
            masking=MaskingResult.from_json(data["masking"]) if data.get("masking") else None,
            seconds=data.get("seconds", 0.0), split=data.get("split"),
        )


# ---- the run -------------------------------------------------------------------------------------

def check_context(model: LoadedModel, lengths: Sequence[int], max_new_tokens: int, margin: int = 64) -> None:
    """Refuse, before any work, contexts that cannot fit in the model's window with the question."""
    too_long = [n for n in lengths if n + margin + max_new_tokens > model.n_ctx]
    if too_long:
        raise PromptTooLongError(
            f"Context lengths {too_long} do not fit {model.spec}'s window of {model.n_ctx} tokens "
            f"(plus ~{margin} tokens of question/template and {max_new_tokens} answer tokens); "
            f"use lengths <= {model.n_ctx - margin - max_new_tokens}.")


def build_samples(model: LoadedModel, needles: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                  template: str, needle_set: Sequence[Needle] = NEEDLES,
                  sentences: Sequence[str] | None = None, stride: int = NEEDLE_STRIDE,
                  shift: int = 0) -> tuple[NiahGrid, list[dict[str, Any]]]:
    """The NIAH grid in this model's tokens (needle x length x depth); every prompt must fit the window.

    Needle i reads the haystack from sentence `(i * stride + shift) mod len(haystack)` (detection: shift 0,
    as `haystack.build_grid`; masking: another shift, so the two phases read different text). Returns the
    grid and, per sample, where it came from: needle, length, depth, haystack offset and the range of
    haystack sentences `[start, stop)` the prompt holds (recorded in the result, checked for overlap)."""
    pool = haystack_sentences() if sentences is None else sentences
    bad = [i for i in needles if not 0 <= i < len(needle_set)]
    if bad:
        raise RetrievalError(f"Needle indices {bad} do not exist; there are {len(needle_set)} needles "
                             f"(0-{len(needle_set) - 1}).")
    grid, records = NiahGrid(samples=[]), []
    for needle_index in needles:
        offset = (needle_index * stride + shift) % max(1, len(pool))
        for length in lengths:
            for depth in depths:
                try:
                    sample = build_sample(model.tokenizer, needle_set[needle_index], int(length), float(depth),
                                          template, pool, offset, needle_index)
                except NeedleNotFoundError as error:
                    grid.skipped.append({"needle_index": needle_index, "context_length": int(length),
                                         "depth": float(depth), "haystack_offset": offset, "reason": str(error)})
                    continue
                model.check_fits(sample.prompt_len)
                grid.samples.append(sample)
                records.append({"needle_index": needle_index, "context_length": int(length), "depth": float(depth),
                                "haystack_offset": offset, "haystack_sentences": _haystack_span(sample, pool, offset)})
    return grid, records


def _haystack_span(sample: NiahSample, pool: Sequence[str], offset: int) -> list[int]:
    """`[start, stop)`: the consecutive haystack sentences from `offset` on that the prompt contains
    (`build_sample` takes whole sentences in order from its offset; a later sentence that happened to
    be a substring of the prompt would only widen the range, which errs towards reporting overlap)."""
    stop = offset
    while stop < len(pool) and pool[stop] in sample.prompt:
        stop += 1
    return [offset, stop]


def split_overlap(detection: Sequence[dict[str, Any]], masking: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the masking grid shares with the detection grid: needles, depths, haystack sentences."""
    used = set()
    for record in detection:
        used.update(range(*record["haystack_sentences"]))
    shared = set()
    for record in masking:
        shared.update(i for i in range(*record["haystack_sentences"]) if i in used)
    return {
        "needles": sorted({r["needle_index"] for r in masking} & {r["needle_index"] for r in detection}),
        "depths": sorted({r["depth"] for r in masking} & {r["depth"] for r in detection}),
        "haystack_sentences": len(shared),
    }


def _phase(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One phase's grid as recorded in the result: needles, lengths, depths, haystack offsets and ranges."""
    ranges: dict[int, list[int]] = {}
    for r in records:
        start, stop = r["haystack_sentences"]
        old = ranges.get(r["needle_index"], [start, stop])
        ranges[r["needle_index"]] = [min(old[0], start), max(old[1], stop)]
    return {
        "needles": sorted({r["needle_index"] for r in records}),
        "lengths": sorted({r["context_length"] for r in records}),
        "depths": sorted({r["depth"] for r in records}),
        "haystack_offsets": {str(n): r["haystack_offset"] for n, r in
                             sorted({r["needle_index"]: r for r in records}.items())},
        "haystack_sentences": {str(n): span for n, span in sorted(ranges.items())},
        "samples": len(records),
    }


def check_split(detection: Sequence[dict[str, Any]], masking: Sequence[dict[str, Any]],
                allow_in_sample: bool) -> dict[str, Any]:
    """The split record of a run; raises `InSampleError` when masking is not held out from detection
    (shared needle, depth or haystack sentence) unless `allow_in_sample`, and then labels it in-sample."""
    overlap = split_overlap(detection, masking)
    in_sample = bool(overlap["needles"] or overlap["depths"] or overlap["haystack_sentences"])
    if in_sample and not allow_in_sample:
        raise InSampleError(
            f"The masking grid is not held out from detection: shared needles {overlap['needles']}, depths "
            f"{overlap['depths']}, {overlap['haystack_sentences']} haystack sentences. Choose other mask_needles / "
            "mask_depths / mask_offset, or set allow_in_sample=True to measure in-sample (labelled in the result).")
    return {"detection": _phase(detection), "masking": _phase(masking), "overlap": overlap,
            "in_sample": in_sample, "allow_in_sample": allow_in_sample}


def _trace_sample(model: LoadedModel, item: tuple[NiahSample, int, str]) -> SampleTrace:
    """One detection sample (a shard item of `probe.parallel.map_items`: samples are independent)."""
    sample, max_new_tokens, match = item
    return fast_sample(model, sample, max_new_tokens, match)


def _mean(tensors: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    if not tensors:
        return torch.full(shape, float("nan"), dtype=torch.float64)
    return torch.stack(tensors).mean(0)


def run(model: LoadedModel, config: RetrievalConfig = QUICK, progress: Progress | None = None,
        needle_set: Sequence[Needle] = NEEDLES, sentences: Sequence[str] | None = None) -> RetrievalResult:
    """Detect retrieval heads over the config's NIAH grid; then the masking experiment if asked.

    `needle_set` / `sentences` replace the project's needles / the Shakespeare haystack (planted tests).

    Raises `PromptTooLongError` for contexts beyond the window, `NoRetrievalError` (with the ungated
    result attached) when the gate keeps no sample, `RetrievalError` when no needle could be located.
    """
    config.validate()
    say = progress or no_progress
    started = time.perf_counter()
    template = resolve_template(model, config.template)
    check_context(model, config.lengths, config.max_new_tokens)
    say(0.0, "building the needle-in-a-haystack prompts")
    grid, records = build_samples(model, config.needles, config.lengths, config.depths, template, needle_set,
                                  sentences, config.haystack_stride)
    if not grid.samples:
        raise RetrievalError(f"No needle could be located in any prompt: {grid.skipped[:3]}")
    mask_grid, split = None, None
    if config.mask_ks:  # built and checked before any scoring: an in-sample split fails in seconds, not hours
        mask_lengths = config.mask_lengths or config.lengths
        check_context(model, mask_lengths, config.max_new_tokens)
        mask_grid, mask_records = build_samples(model, config.mask_needles, mask_lengths, config.masking_depths(),
                                                template, needle_set, sentences, config.haystack_stride,
                                                config.masking_offset())
        if not mask_grid.samples:
            raise RetrievalError(f"No needle could be located in any masking prompt: {mask_grid.skipped[:3]}")
        split = check_split(records, mask_records, config.allow_in_sample)
    shape = (model.n_layers, model.n_heads)
    samples: list[dict[str, Any]] = []
    per_events: list[torch.Tensor] = []
    per_unique: list[torch.Tensor] = []
    detect_share = 0.6 if config.mask_ks else 1.0
    with large_blocks_mapped():  # prompts of many lengths: the heap kept their activations resident (runtime)
        traces = map_items(model, _trace_sample, [(s, config.max_new_tokens, config.match) for s in grid.samples],
                           lambda done, total: say(detect_share * done / total, f"scoring sample {done + 1} of {total}"
                                                   if done < total else f"scored {total} samples"))  # probe.parallel
    for sample, record, trace in zip(grid.samples, records, traces):
        span = sample.answer_tokens[1] - sample.answer_tokens[0]
        stemmed = rouge1(sample.needle.answer, trace.response, stem=True)
        unstemmed = rouge1(sample.needle.answer, trace.response, stem=False)
        recall = stemmed if config.rouge_stem else unstemmed
        retained = (recall > config.rouge_threshold) or not config.rouge_gate
        per_events.append(trace.events.to(torch.float64) / span)
        per_unique.append(trace.unique.to(torch.float64) / span)
        samples.append({**sample.summary(), "response": trace.response, "answer_len": len(trace.answer_ids),
                        "rouge1_recall": recall, "rouge1_recall_stemmed": stemmed,
                        "rouge1_recall_unstemmed": unstemmed, "success": recall > config.rouge_threshold,
                        "retained": retained, "needle_distance": sample.prompt_len - sample.answer_tokens[1],
                        "haystack_offset": record["haystack_offset"],
                        "haystack_sentences": record["haystack_sentences"]})
    kept = [i for i, s in enumerate(samples) if s["retained"]]
    per_sample = {"events": torch.stack(per_events), "unique": torch.stack(per_unique)}
    prov = provenance(model, ANALYZER, VERSION, config,
                      {"samples": [s for s in (x.summary() for x in grid.samples)], "template": template},
                      config.seed)
    variants: dict[str, HeadScores] = {}
    for mode in SCORE_MODES:
        units = "copy events / answer tokens" if mode == "events" else "distinct answer tokens copied / answer tokens"
        variants[mode] = HeadScores(f"retrieval score ({mode})", units,
                                    _mean([per_sample[mode][i] for i in kept], shape), prov,
                                    f"mean over {len(kept)} retained of {len(grid.samples)} scored samples")
        variants[f"{mode}_ungated"] = HeadScores(f"retrieval score ({mode}, ungated)", units,
                                                 per_sample[mode].mean(0), prov,
                                                 f"mean over all {len(grid.samples)} scored samples")
    result = RetrievalResult(
        scores=variants[config.score_mode], variants=variants, per_sample=per_sample, samples=samples,
        skipped=grid.skipped, config=asdict(config), template=template, group_size=model.group_size,
        n_kv_heads=model.n_kv_heads, provenance=prov, split=split,
    )
    if not kept:
        result.scores = variants[f"{config.score_mode}_ungated"]
        raise NoRetrievalError(
            f"No sample passed the ROUGE-1 recall gate (> {config.rouge_threshold}) on {model.spec}: "
            f"0 of {len(grid.samples)} retrieved the answer, so there are no gated scores. "
            "Try shorter contexts, the other prompt template, or rouge_gate=False for diagnosis "
            "(the ungated result is attached to this error as `.result`).", result)
    if config.mask_ks and mask_grid is not None:
        top = [head for head, _ in result.scores.top(max(config.mask_ks))]
        exclude = random_pool_exclusion(result.scores, max(config.mask_ks), config.threshold)
        with large_blocks_mapped():
            result.masking = masking_experiment(
                model, mask_grid.samples, top, config.mask_ks, config.mask_kinds, config.mask_random_draws,
                config.seed, config.max_new_tokens, config.mask_batch,
                lambda f, m: say(detect_share + (1 - detect_share) * f, m), exclude=exclude,
                stem=config.rouge_stem, rouge_threshold=config.rouge_threshold)
        result.masking.skipped = mask_grid.skipped
    result.seconds = time.perf_counter() - started
    say(1.0, "done")
    return result


# ---- masking -------------------------------------------------------------------------------------

def random_pool_exclusion(scores: HeadScores, top_n: int, threshold: float) -> list[Head]:
    """The heads no random set may contain: the top `top_n` (the masked list) and every head scoring
    above the retrieval threshold, however many (spec pitfall 1: a 'random' set holding retrieval heads
    is no control)."""
    heads = [head for head, _ in scores.top(top_n)] + [head for head, _ in scores.above(threshold)]
    return sorted(set(heads))


def masking_conditions(model: LoadedModel, top: Sequence[Head], ks: Sequence[int], kinds: Sequence[str],
                       draws: int, seed: int, exclude: Sequence[Head] = ()) -> list[dict[str, Any]]:
    """No masking, then per kind and k: the top-k heads and `draws` seeded random k-sets drawn from the
    heads outside the whole top list and outside `exclude` (every head above the threshold, see
    `random_pool_exclusion`), so no random set contains a retrieval head."""
    if max(ks) > len(top):
        raise RetrievalError(f"Cannot mask the top {max(ks)} heads: only {len(top)} are ranked.")
    banned = sorted(set(top) | set(exclude))
    conditions: list[dict[str, Any]] = [{"kind": "", "selection": "none", "k": 0, "draw": 0, "heads": []}]
    for kind in kinds:
        for k in ks:
            conditions.append({"kind": kind, "selection": "top", "k": k, "draw": 0, "heads": list(top[:k])})
            try:
                sets = random_head_sets(model, k, draws, exclude=banned, seed=seed + 1000 * k)
            except ValueError as error:
                raise RetrievalError(f"Random {k}-head sets: {error} ({len(banned)} heads excluded: the top list "
                                     "and every head above the threshold).") from error
            for draw, heads in enumerate(sets):
                conditions.append({"kind": kind, "selection": "random", "k": k, "draw": draw, "heads": heads})
    return conditions


def _condition_intervention(condition: dict[str, Any], start: int, row: int) -> Intervention | None:
    heads = condition["heads"]
    if not heads:
        return None
    where = {"start": start, "rows": (row,)}
    return uniform_attention(heads, **where) if condition["kind"] == "uniform" else zero_ablation(heads, **where)


@torch.no_grad()
def masked_answers(model: LoadedModel, sample: NiahSample, conditions: Sequence[dict[str, Any]],
                   max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy answers under each condition. The prefill of `prompt[:-1]` runs once, unmasked; the
    conditions decode as batch rows from the last prompt token on, each with its own heads masked."""
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    stops = _stop_ids(model)
    prefill = _new_cache(model)
    from probe.forward import on_fused_path

    with model.lock, on_fused_path(model):  # unmasked prefill on the model's SDPA attention
        model.hf_model(ids[:, :-1], past_key_values=prefill, use_cache=True, logits_to_keep=1)
    def decode(chunk: Sequence[dict[str, Any]]) -> list[str]:  # out-of-memory: batching halves the chunk
        cache = _copy_cache(prefill, len(chunk))
        generated: list[list[int]] = [[] for _ in chunk]
        active = list(range(len(chunk)))  # condition of each batch row; finished rows leave the batch
        tokens = ids[:, -1:].repeat(len(chunk), 1)
        steps = 0
        while active and steps < max_new_tokens:
            interventions = [i for row, slot in enumerate(active)
                             if (i := _condition_intervention(chunk[slot], n - 1, row)) is not None]
            # fused path (uniform = a zero query, zero = z ablation; positions from the cache length) where exact
            with intervene(model, interventions), on_fused_path(model):
                while steps < max_new_tokens:
                    out = model.hf_model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    steps += 1
                    next_ids = out.logits[:, -1].argmax(-1).tolist()
                    keep = []
                    for row, token in enumerate(next_ids):
                        if not _is_stop(model, token, stops):
                            generated[active[row]].append(token)
                            keep.append(row)
                    tokens = torch.tensor([next_ids[r] for r in keep], device=model.device).view(-1, 1)
                    if len(keep) < len(active):
                        active = [active[r] for r in keep]
                        if keep:
                            cache.batch_select_indices(torch.tensor(keep, device=model.device))
                        break  # rebuild the per-row interventions for the smaller batch
        return [model.decode(g) for g in generated]

    size = batching.choose(model, n + max_new_tokens, batch)  # what fits in free memory, <= batch
    return batching.map_batched(decode, list(conditions), size, what="retrieval masking decode")


def _copy_cache(cache: Any, repeats: int) -> Any:
    import copy

    clone = copy.deepcopy(cache)
    clone.batch_repeat_interleave(repeats)
    return clone


def masking_experiment(model: LoadedModel, samples: Sequence[NiahSample], top: Sequence[Head], ks: Sequence[int],
                       kinds: Sequence[str] = MASK_KINDS, draws: int = 3, seed: int = 0, max_new_tokens: int = 24,
                       batch: int = 16, progress: Progress | None = None, exclude: Sequence[Head] = (),
                       stem: bool = True, rouge_threshold: float = 0.5) -> MaskingResult:
    """ROUGE-1 recall of every prompt under no masking, top-k masking and random-k masking (random pool:
    outside `top` and `exclude`). Recall with the other stemming setting is kept too (`recall_other`)."""
    say = progress or no_progress
    started = time.perf_counter()
    conditions = masking_conditions(model, top, ks, kinds, draws, seed, exclude)
    recall: list[list[float]] = [[] for _ in conditions]
    other: list[list[float]] = [[] for _ in conditions]
    responses: list[list[str]] = [[] for _ in conditions]
    for index, sample in enumerate(samples):
        say(index / max(1, len(samples)), f"masking: {sample.label}")
        for slot, answer in enumerate(masked_answers(model, sample, conditions, max_new_tokens, batch)):
            recall[slot].append(rouge1(sample.needle.answer, answer, stem))
            other[slot].append(rouge1(sample.needle.answer, answer, not stem))
            responses[slot].append(answer)
    return MaskingResult(
        conditions=[{**c, "heads": [str(h) for h in c["heads"]]} for c in conditions],
        prompts=[s.summary() for s in samples], recall=recall, responses=responses,
        seconds=time.perf_counter() - started, stemmed=stem, recall_other=other,
        excluded=[str(h) for h in sorted(set(top) | set(exclude))], rouge_threshold=rouge_threshold)


# ---- figures -------------------------------------------------------------------------------------

def figures(result: RetrievalResult) -> dict[str, Any]:
    """Heatmap of scores, ranked bar of the top heads, NIAH accuracy grids, accuracy-vs-k curves."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    scores = result.scores.scores
    figs["heatmap"] = go.Figure(go.Heatmap(
        z=scores.tolist(), x=[f"H{h}" for h in range(scores.shape[1])], y=[f"L{l}" for l in range(scores.shape[0])],
        colorscale="Viridis", colorbar={"title": "score"}))
    figs["heatmap"].update_layout(
        title=f"Retrieval score ({result.config['score_mode']}), {result.retained}/{result.attempted} samples retained",
        xaxis_title="query head", yaxis_title="layer", yaxis_autorange="reversed")

    top = result.scores.top(min(20, scores.numel()))
    figs["top_heads"] = go.Figure(go.Bar(x=[str(h) for h, _ in top], y=[s for _, s in top],
                                         marker_color=["crimson" if s > result.threshold else "grey" for _, s in top]))
    figs["top_heads"].add_hline(y=result.threshold, line_dash="dash", annotation_text=f"threshold {result.threshold:g}")
    figs["top_heads"].update_layout(title="Top heads by retrieval score", xaxis_title="head", yaxis_title="score")

    figs["niah_grid"] = _grid_figure(result.samples, [s["rouge1_recall"] for s in result.samples],
                                     "NIAH ROUGE-1 recall (no masking)")
    masking = result.masking
    if masking:
        kinds = sorted({c["kind"] for c in masking.conditions if c["selection"] != "none"})
        k_max = max(c["k"] for c in masking.conditions)
        for kind in kinds:
            for selection in ("top", "random"):
                picked = masking.find(kind, selection, k_max)
                if not picked:
                    continue
                per_prompt = [sum(masking.recall[i][j] for i in picked) / len(picked)
                              for j in range(len(masking.prompts))]
                figs[f"niah_grid_{kind}_{selection}{k_max}"] = _grid_figure(
                    masking.prompts, per_prompt,
                    f"NIAH ROUGE-1 recall, {selection} {k_max} heads masked ({kind})"
                    + (f", mean of {len(picked)} draws" if selection == "random" else ""))
        figs["accuracy_vs_k"] = _curve_figure(masking)
    return figs


def _grid_figure(prompts: Sequence[dict[str, Any]], values: Sequence[float], title: str) -> Any:
    import plotly.graph_objects as go

    lengths = sorted({p["context_length"] for p in prompts})
    depths = sorted({p["depth"] for p in prompts})
    z = []
    for depth in depths:
        row = []
        for length in lengths:
            cell = [v for p, v in zip(prompts, values) if p["context_length"] == length and p["depth"] == depth]
            row.append(100 * sum(cell) / len(cell) if cell else None)
        z.append(row)
    fig = go.Figure(go.Heatmap(z=z, x=[str(n) for n in lengths], y=[f"{d:g}%" for d in depths],
                               zmin=0, zmax=100, colorscale="RdYlGn", colorbar={"title": "recall %"},
                               texttemplate="%{z:.0f}%"))
    # category axes: plotly would otherwise read "512" / "50%" as numbers and stretch the cells
    fig.update_layout(title=title, xaxis_title="context length (tokens)", yaxis_title="needle depth",
                      xaxis_type="category", yaxis_type="category")
    return fig


def _curve_figure(masking: MaskingResult) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    kinds = sorted({c["kind"] for c in masking.conditions if c["selection"] != "none"})
    base = masking.accuracy(masking.find("", "none", 0)[0])
    for kind, dash in zip(kinds, ("solid", "dot")):
        rows = [r for r in masking.table() if r["kind"] == kind]
        ks = [0] + [r["k"] for r in rows]
        fig.add_trace(go.Scatter(x=ks, y=[100 * base] + [100 * r["top"] for r in rows], mode="lines+markers",
                                 name=f"top-k ({kind})", line={"color": "crimson", "dash": dash}))
        fig.add_trace(go.Scatter(x=ks, y=[100 * base] + [100 * r["random_mean"] for r in rows], mode="lines",
                                 name=f"random-k mean ({kind})", line={"color": "steelblue", "dash": dash}))
        fig.add_trace(go.Scatter(x=[r["k"] for r in rows for _ in r["random"]],
                                 y=[100 * a for r in rows for a in r["random"]], mode="markers",
                                 name=f"random-k draws ({kind})", marker={"color": "steelblue", "opacity": 0.5}))
    fig.update_layout(title="NIAH accuracy vs number of masked heads", xaxis_title="k heads masked",
                      yaxis_title="mean ROUGE-1 recall (%)", yaxis_range=[0, 105])
    return fig


def summary_text(result: RetrievalResult, top: int = 10) -> str:
    """A few lines for the CLI and reports."""
    lines = [
        f"retrieval heads on {result.provenance.model_spec} ({result.template} template): "
        f"{result.retained}/{result.attempted} samples retained "
        f"({sum(s['success'] for s in result.samples)} retrieved, {len(result.skipped)} skipped)",
        f"heads > {result.threshold:g}: {len(result.retrieval_heads())} of {result.scores.scores.numel()}",
        "top: " + ", ".join(f"{h} {s:.2f}" for h, s in result.scores.top(top)),
    ]
    changes = result.stem_changes()
    lines.append(f"ROUGE-1 {'stemmed' if result.config.get('rouge_stem', True) else 'unstemmed'}: stemming changes "
                 f"{changes['verdict_changed']} of {changes['samples']} detection verdicts")
    if result.split:
        det, mask = result.split["detection"], result.split["masking"]
        label = "IN-SAMPLE (allow_in_sample)" if result.split["in_sample"] else "held out"
        lines.append(f"masking {label}: detect needles {det['needles']} depths {det['depths']}; "
                     f"mask needles {mask['needles']} depths {mask['depths']}; "
                     f"{result.split['overlap']['haystack_sentences']} haystack sentences shared")
    if result.masking:
        for row in result.masking.table():
            lines.append(f"mask {row['kind']} k={row['k']}: none {100 * row['none']:.0f}%, top {100 * row['top']:.0f}%, "
                         f"random {', '.join(f'{100 * a:.0f}' for a in row['random'])}%")
        moved = result.masking.stem_changes()
        lines.append(f"masking: stemming changes the recall of {moved['recall_changed']} and the verdict of "
                     f"{moved['verdict_changed']} of {moved['answers']} masked answers; random sets avoid "
                     f"{len(result.masking.excluded or [])} heads (top list + all above {result.threshold:g})")
    return "\n".join(lines)


__all__ = [
    "RetrievalConfig", "RetrievalResult", "MaskingResult", "RetrievalError", "NoRetrievalError", "InSampleError",
    "QUICK", "DEFAULT", "run", "figures", "fast_sample", "reference_sample", "answer_rows", "attention_geometry",
    "masking_experiment", "masked_answers", "masking_conditions", "random_pool_exclusion", "check_split",
    "split_overlap", "build_samples", "rouge1", "summary_text",
]


def summary(result: RetrievalResult) -> str:
    """The plain-text summary the scan and the app show (same as `summary_text`)."""
    return summary_text(result)
