"""DuoAttention (Xiao et al. 2024): learned per-KV-head gates between full and streaming attention.

With the model frozen, every KV head g of layer l gets a gate α[l, g] ∈ [0, 1]; the student's query
heads of that group output z = α·z_full + (1 − α)·z_stream before the output projection, as the
reference's two-way forward does: z_full is the frozen teacher's (full attention on the teacher's own
hidden states, no gradient), z_stream the student's attention restricted to the attention sink ∪
recent window, on the student's states, so drift builds up only through streaming heads. The loss is
the mean squared distance between the student's and the teacher's hidden states after the final norm
(weight included, `probe.readout.final_norm`) on the answer tokens of a fresh synthetic multi-passkey
prompt at every step, plus λ·mean|α|. Deployment keeps the top fraction of KV heads (global quantile)
as retrieval heads and restricts the rest to sink + recent; we evaluate NIAH accuracy in a labelled
regime against full attention and against random streaming sets of the same size.

Scaled to the CPU (spec §8): contexts of a few hundred tokens, 3 passkeys of 8 NATO words, exact
token windows (sink 16 / recent 64) in training and deployment, a wall-clock budget on training.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch

from analyses.common import Progress, no_progress, provenance
from analyses.data.haystack import build_grid, haystack_sentences, rouge1_recall
from analyses.data.needles import NEEDLES, Needle
from probe.architecture import architecture
from probe.errors import ProbeError
from probe.heads import Head
from probe.forward import forward_for_hooks
from probe.generation import decode_variants
from probe.interventions import Intervention, intervene, streaming_attention, streaming_mask, z_capture_hooks
from probe.models import LoadedModel
from probe.readout import final_norm
from probe.results import HeadScores, Provenance, ResultCache, to_jsonable
from probe.runtime import release_free_memory

ANALYZER = "duo"
VERSION = "2"  # 2: teacher full branch, final norm with its weight, a fresh sample per step
REGIMES = ("decode-only", "all-positions")
# which hidden states the full-attention branch of a gated head reads: "teacher" (the reference: the
# frozen full model's, so the distance measures only what streaming heads lose) or "student" (the
# student's own, drifted states: what a retrieval head actually reads at deployment, where errors of
# earlier streaming heads compound through it; kept to measure that deployment-like drift)
FULL_BRANCHES = ("teacher", "student")
NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
        "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


class DuoError(ProbeError):
    """A DuoAttention setting that cannot work on this model."""


@dataclass(frozen=True)
class DuoConfig:
    """Every knob; defaults sized for a 2-core CPU (raise lengths/steps on a GPU)."""

    context_length: int = 384          # haystack tokens per training prompt
    n_passkeys: int = 3
    passkey_words: int = 8
    sink: int = 16
    recent: int = 64
    steps: int = 60
    max_seconds: float = 600.0         # stop training early when this wall-clock budget is spent
    lr: float = 0.02
    reg_weight: float = 0.05           # λ
    retrieval_fraction: float = 0.5    # share of KV heads kept as retrieval heads at deployment
    regime: str = "decode-only"        # decode-only | all-positions (which queries streaming heads restrict)
    full_branch: str = "teacher"       # teacher (reference) | student: whose states the full branch reads
    eval_lengths: tuple[int, ...] = (512,)
    eval_depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    eval_needles: tuple[int, ...] = (0, 1)
    template: str = "auto"             # auto: chat if the model has a chat template, else base
    random_draws: int = 3
    max_new_tokens: int = 24
    memory_context: int = 8192         # context length at which the KV-cache saving is reported
    seed: int = 0

    def validate(self) -> None:
        if self.full_branch not in FULL_BRANCHES:
            raise DuoError(f"Unknown full_branch {self.full_branch!r}; choose {', '.join(FULL_BRANCHES)}.")
        if self.regime not in REGIMES:
            raise DuoError(f"Unknown regime {self.regime!r}; choose {', '.join(REGIMES)}.")
        if not 0 < self.retrieval_fraction < 1:
            raise DuoError("retrieval_fraction must be strictly between 0 and 1.")
        if self.sink < 0 or self.recent < 1 or self.steps < 1 or self.n_passkeys < 1:
            raise DuoError("sink >= 0, recent >= 1, steps >= 1 and n_passkeys >= 1 are required.")


# Demo-scan size; raise steps for a real run. 256 haystack tokens keep the quick scan's peak memory
# bounded: training on SmolLM2 peaked at 2.7 GB with 384 (each layer recomputed in the backward),
# 1.7 GB with 256 (bench/bench_memory.py).
# max_seconds is a safety net, not part of the preset: a cap the run reaches makes the gates depend on the
# machine's speed (240 s stopped one quick scan after 4 steps at load ~9 and let another do all 20: gate
# Pearson 0.50). 20 fused steps take ~100 s on one idle 2-core CPU thread.
QUICK = DuoConfig(steps=20, max_seconds=1200.0, context_length=256)


# ---- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PasskeySample:
    """One training prompt: token ids and the positions whose hidden states are distilled."""

    ids: torch.Tensor        # [1, T]
    loss_positions: torch.Tensor  # [n] positions of the QA block (questions and passkeys)


def passkey_sample(model: LoadedModel, config: DuoConfig, rng: random.Random, sentences: Sequence[str]) -> PasskeySample:
    """Haystack with `n_passkeys` passkeys at sorted random depths, then the questions with their answers."""
    tokenizer = model.tokenizer
    start = rng.randrange(0, max(1, len(sentences) - 2000))
    chosen, total = [], 0
    for sentence in sentences[start:]:
        n = len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
        if total + n > config.context_length:
            break
        chosen.append(sentence)
        total += n
    keys = [" ".join(rng.choice(NATO) for _ in range(config.passkey_words)) for _ in range(config.n_passkeys)]
    slots = sorted(rng.sample(range(1, max(2, len(chosen))), min(config.n_passkeys, max(1, len(chosen) - 1))))
    parts = list(chosen)
    for index, slot in reversed(list(enumerate(slots))):
        parts.insert(slot, f"\n\nRemember this sequence of words, it's the {ORDINALS[index]} passkey to the vault: "
                           f"{keys[index]}\n\n")
    book = "This is a very long story book: <book> " + " ".join(parts) + " </book>.\n\n"
    qa = "".join(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\n"
                 f"Passkey: {keys[i]}\n\n" for i in range(len(slots)))
    book_ids = model.encode(book)
    qa_ids = model.encode(qa, add_special_tokens=False)
    ids = torch.cat([book_ids, qa_ids], dim=1)
    model.check_fits(ids.shape[1])
    positions = torch.arange(book_ids.shape[1], ids.shape[1], device=ids.device)
    return PasskeySample(ids, positions)


# ---- the gated student ---------------------------------------------------------------------------

def _alpha(model: LoadedModel, gates: torch.Tensor, layer: int, like: torch.Tensor) -> torch.Tensor:
    """The layer's gate per query head `[H]` (its KV group's, the architecture layer's `kv_index`), on the
    layer's device and dtype."""
    kv_index = architecture(model).kv_index.to(gates.device)
    return gates[layer].clamp(0, 1)[kv_index].to(like.device, like.dtype)


def gate_hooks(model: LoadedModel, gates: torch.Tensor, sink: int, recent: int) -> list[tuple[str, Any]]:
    """The "student" full branch (`full_branch="student"`): hooks that return α·P_full + (1 − α)·P_stream
    at `hook_pattern`, on the student's own scores (equal to blending z, since z = P·v). Bridge only (it
    reads the pattern). `hook_attn_scores` is read after the family's own soft-cap, causal and
    sliding-window masks."""
    hooks: list[tuple[str, Any]] = []
    for layer in range(model.n_layers):
        saved: dict[str, torch.Tensor] = {}

        def keep_scores(scores: torch.Tensor, hook: Any, saved=saved) -> torch.Tensor:
            saved["scores"] = scores
            return scores

        def blend(pattern: torch.Tensor, hook: Any, saved=saved, layer=layer) -> torch.Tensor:
            scores = saved.pop("scores")
            q_len, k_len = scores.shape[-2], scores.shape[-1]
            keep = streaming_mask(torch.arange(k_len - q_len, k_len, device=scores.device), k_len, sink, recent)
            stream = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            stream = torch.softmax(stream, dim=-1, dtype=torch.float32).to(pattern.dtype)
            alpha = _alpha(model, gates, layer, pattern).view(1, -1, 1, 1)
            return alpha * pattern + (1 - alpha) * stream

        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", keep_scores), (f"blocks.{layer}.attn.hook_pattern", blend)]
    return hooks


def teacher_blend(model: LoadedModel, gates: torch.Tensor, sink: int, recent: int,
                  teacher_z: Sequence[torch.Tensor]) -> tuple[list[tuple[str, Any]], list[Intervention]]:
    """The reference's gated student (`full_branch="teacher"`): every head's attention restricted to sink ∪
    recent at every position (a streaming intervention: a mask on the fused path, the scores on the bridge),
    and `hook_z` returns α·z_teacher + (1 − α)·z_stream with `teacher_z` per layer (the teacher's `hook_z`,
    `[B, T, H, d_head]`). Attach both together: `model.hooks(hooks)` and `intervene(model, interventions)`.
    Nothing reads the pattern, so the student runs on the fused path where the model allows it."""
    def mix(layer: int) -> Any:
        def mix_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
            alpha = _alpha(model, gates, layer, z).view(1, 1, -1, 1)
            return alpha * teacher_z[layer].to(z.device, z.dtype) + (1 - alpha) * z
        return mix_z

    hooks = [(f"blocks.{layer}.attn.hook_z", mix(layer)) for layer in range(model.n_layers)]
    return hooks, [streaming_attention(model.all_heads(), sink, recent, start=0)]


def _final_residual_hook(captured: dict[str, torch.Tensor]) -> tuple[str, Any]:
    def grab(value: torch.Tensor, hook: Any) -> torch.Tensor:
        captured.setdefault("resid", value)
        return value

    return ("ln_final.hook_in", grab)


@torch.no_grad()
def final_states(model: LoadedModel, ids: torch.Tensor, hooks: list[tuple[str, Any]] | None = None) -> torch.Tensor:
    """The hidden states after the final norm, its weight included (`probe.readout.final_norm`, the
    reference's distillation target), `[T, d_model]`, under `hooks` and the open `intervene()` blocks (on
    the fused path where they allow it)."""
    captured: dict[str, torch.Tensor] = {}
    with model.hooks(list(hooks or []) + [_final_residual_hook(captured)]), forward_for_hooks(model) as run:
        run(ids)
    return final_norm(model, captured["resid"])[0]


@dataclass(frozen=True)
class Teacher:
    """The frozen full model on one sample: final states at the loss positions and every layer's z."""

    states: torch.Tensor            # [n, d_model]
    z: list[torch.Tensor]           # per layer [1, T, H, d_head]


@torch.no_grad()
def teacher_run(model: LoadedModel, sample: PasskeySample) -> Teacher:
    """One plain forward (no gradient): the distillation target and the full branch's head outputs."""
    hooks, z = z_capture_hooks(range(model.n_layers))
    states = final_states(model, sample.ids, hooks)
    return Teacher(states[sample.loss_positions], [z[layer] for layer in range(model.n_layers)])


def distillation_loss(model: LoadedModel, gates: torch.Tensor, sample: PasskeySample, teacher: Teacher,
                      config: DuoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(distillation, total loss) of the gated student on one sample, after its backward into the
    gates (run while the hooks are attached). Call it inside `model.recompute_layers_in_backward()` for
    the memory bound: the recomputed layers run the gate hooks again (and find the same path in place)."""
    captured: dict[str, torch.Tensor] = {}
    if config.full_branch == "teacher":
        hooks, interventions = teacher_blend(model, gates, config.sink, config.recent, teacher.z)
    else:
        hooks, interventions = gate_hooks(model, gates, config.sink, config.recent), []
    hooks = hooks + [_final_residual_hook(captured)]
    with model.hooks(hooks), intervene(model, interventions), forward_for_hooks(model) as run:
        run(sample.ids)
        student = final_norm(model, captured["resid"])[0]
        distill = (student[sample.loss_positions] - teacher.states).pow(2).mean(-1).mean()
        loss = distill + config.reg_weight * gates.clamp(0, 1).abs().mean()
        if loss.requires_grad:
            loss.backward()  # hooks and path stay in place: recomputed layers run them again
    return distill.detach(), loss.detach()


def sample_stream(model: LoadedModel, config: DuoConfig, sentences: Sequence[str] | None = None,
                  samples: Sequence[PasskeySample] | None = None) -> Iterator[PasskeySample]:
    """The training prompts, one per step: given `samples` are cycled; otherwise a fresh synthetic
    passkey sample at every step (new passkeys, depths and haystack, as the reference), drawn from
    `random.Random(config.seed)` so a run is reproducible."""
    if samples is not None:
        while True:
            yield from samples
    rng = random.Random(config.seed)
    pool = haystack_sentences() if sentences is None else sentences
    while True:
        yield passkey_sample(model, config, rng, pool)


@dataclass
class Training:
    gates: torch.Tensor  # [L, n_kv]
    losses: list[float]
    distill: list[float]
    gate_history: list[list[list[float]]]
    seconds: float
    steps_done: int
    sample_digests: list[str] = field(default_factory=list)  # a short hash of each step's prompt ids


def _digest(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:12]


def train_gates(model: LoadedModel, config: DuoConfig, progress: Progress = no_progress,
                samples: Sequence[PasskeySample] | None = None, sentences: Sequence[str] | None = None) -> Training:
    """Optimise the gates (AdamW, linear warm-up/decay as the reference), model weights frozen."""
    config.validate()
    torch.manual_seed(config.seed)
    stream = sample_stream(model, config, sentences, samples)
    gates = torch.nn.Parameter(torch.ones(model.n_layers, model.n_kv_heads, device=model.device, dtype=torch.float32))
    optimiser = torch.optim.AdamW([gates], lr=config.lr, weight_decay=0.0)
    warm, cool = max(1, int(0.2 * config.steps)), max(1, int(0.2 * config.steps))

    def lr_factor(step: int) -> float:
        if step < warm:
            return max(0.1, (step + 1) / warm)
        if step >= config.steps - cool:
            return max(0.1, (config.steps - step) / cool)
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    losses, distills, history, digests = [], [], [], []
    start = time.perf_counter()
    step = 0
    for step in range(config.steps):
        sample = next(stream)
        digests.append(_digest(sample.ids))
        teacher = teacher_run(model, sample)
        optimiser.zero_grad()
        with model.recompute_layers_in_backward():
            distill, loss = distillation_loss(model, gates, sample, teacher, config)
        del teacher
        optimiser.step()
        release_free_memory()
        scheduler.step()
        with torch.no_grad():
            gates.clamp_(0, 1)
        losses.append(float(loss))
        distills.append(float(distill))
        if step % 5 == 0 or step == config.steps - 1:
            history.append(gates.detach().cpu().tolist())
        elapsed = time.perf_counter() - start
        progress(0.6 * (step + 1) / config.steps, f"gate step {step + 1}/{config.steps}, loss {losses[-1]:.4f}")
        if elapsed > config.max_seconds:
            break
    return Training(gates.detach().cpu(), losses, distills, history, time.perf_counter() - start, step + 1, digests)


# ---- deployment ----------------------------------------------------------------------------------

def binarise(gates: torch.Tensor, retrieval_fraction: float, seed: int = 0) -> torch.Tensor:
    """True = retrieval KV head: gates at or above the global quantile that keeps `retrieval_fraction`.

    Ties are broken by a tiny seeded noise, as the reference does, so the ratio is met exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    noisy = gates.double() + 1e-9 * torch.rand(gates.shape, generator=generator, dtype=torch.float64)
    n_keep = max(1, round(retrieval_fraction * gates.numel()))
    threshold = noisy.flatten().sort(descending=True).values[n_keep - 1]
    return noisy >= threshold


def streaming_heads(model: LoadedModel, retrieval: torch.Tensor) -> list[Head]:
    """All query heads of the KV heads that are not retrieval heads (the architecture layer's GQA map)."""
    arch = architecture(model)
    return [Head(l, q) for l in range(model.n_layers) for g in range(model.n_kv_heads) if not retrieval[l, g]
            for q in range(model.n_heads) if arch.kv_of(q) == g]


def kv_cache_bytes(model: LoadedModel, retrieval: torch.Tensor, context: int, sink: int, recent: int) -> dict[str, float]:
    """KV-cache size for one sequence of `context` tokens: full vs retrieval heads full + streaming sink+recent."""
    per_head_token = 2 * model.d_head * torch.finfo(model.dtype).bits // 8  # keys and values
    total_heads = retrieval.numel()
    n_retrieval = int(retrieval.sum())
    full = total_heads * context * per_head_token
    duo = (n_retrieval * context + (total_heads - n_retrieval) * min(context, sink + recent)) * per_head_token
    return {"context": context, "full_bytes": full, "duo_bytes": duo, "saving": 1 - duo / full,
            "ratio": full / duo}


def _answer_recall(model: LoadedModel, sample: Any, new_ids: torch.Tensor | Sequence[int]) -> float:
    answer = model.decode(new_ids)
    return rouge1_recall(sample.needle.answer, answer.split("\n")[0] if answer.strip() else answer)


@torch.no_grad()
def niah_accuracy(model: LoadedModel, samples: Sequence[Any], heads: Sequence[Head], config: DuoConfig) -> list[float]:
    """ROUGE-1 recall of each sample's greedy answer with `heads` restricted to sink + recent."""
    scores = []
    for sample in samples:
        ids = sample.ids(model.device)
        start = ids.shape[1] if config.regime == "decode-only" else 0
        interventions = [streaming_attention(heads, config.sink, config.recent, start=start)] if heads else []
        with intervene(model, interventions):
            scores.append(_answer_recall(model, sample, model.generate(ids, max_new_tokens=config.max_new_tokens)))
    return scores


@torch.no_grad()
def niah_runs(model: LoadedModel, samples: Sequence[Any], head_sets: Sequence[Sequence[Head]], config: DuoConfig,
              progress: Progress = no_progress) -> list[list[float]]:
    """`niah_accuracy` for each streaming head set (`[]`: full attention), per set a score per sample.

    Decode-only regime: the prompt is the same under every set (streaming starts after it), so each sample
    is prefilled once and every set decodes from that cache in one batch (`probe.generation.decode_variants`);
    each set's answers equal its own `niah_accuracy` up to batched float rounding. All-positions: one set
    at a time."""
    if config.regime != "decode-only":
        return [niah_accuracy(model, samples, heads, config) for heads in head_sets]
    runs: list[list[float]] = [[] for _ in head_sets]
    for index, sample in enumerate(samples):
        progress(index / max(1, len(samples)), f"NIAH sample {index + 1}/{len(samples)}, {len(head_sets)} head sets")
        ids = sample.ids(model.device)
        variants = [[streaming_attention(heads, config.sink, config.recent, start=ids.shape[1])] if heads else []
                    for heads in head_sets]
        for run, new in zip(runs, decode_variants(model, ids, variants, config.max_new_tokens)):
            run.append(_answer_recall(model, sample, new))
    return runs


def profiling_scores(model: LoadedModel, sample: PasskeySample, sink: int, recent: int) -> torch.Tensor:
    """The training-free baseline (mlx-lm PR #1522 idea): attention mass outside sink ∪ recent, per KV
    head (mean over its query heads and the QA positions)."""
    names = {f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)}
    with torch.no_grad():
        _, cache = model.run_with_cache(sample.ids, names_filter=lambda n: n in names)  # holds model.lock
    out = torch.zeros(model.n_layers, model.n_kv_heads)
    k_len = sample.ids.shape[1]
    keep = streaming_mask(sample.loss_positions, k_len, sink, recent)
    for l in range(model.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0][:, sample.loss_positions]  # [H, n, k]
        outside = (pattern * (~keep).to(pattern.device, pattern.dtype)).sum(-1).mean(-1)  # [H], on the layer's device
        kv_index = architecture(model).kv_index.to(outside.device)
        groups = torch.zeros(model.n_kv_heads, dtype=outside.dtype, device=outside.device).index_add_(0, kv_index, outside)
        out[l] = (groups / torch.bincount(kv_index, minlength=model.n_kv_heads).to(groups)).cpu()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # average ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def group_max(model: LoadedModel, scores: torch.Tensor) -> torch.Tensor:
    """Query-head scores `[L, H]` → per KV group `[L, n_kv]` (max over the group's query heads)."""
    scores = torch.nan_to_num(scores.double(), nan=0.0)
    kv_index = architecture(model).kv_index
    return torch.stack([scores[:, kv_index == g].max(-1).values for g in range(model.n_kv_heads)], dim=1)


def retrieval_agreement(model: LoadedModel, gates: torch.Tensor) -> dict[str, Any] | None:
    """Rank correlation with the newest cached retrieval-heads result for this model, if any."""
    for entry in ResultCache().entries(model.fingerprint):
        if entry["provenance"]["analyzer"] == "retrieval":
            scores = HeadScores.from_json(entry["result"]["scores"])
            return {"spearman": spearman(gates, group_max(model, scores.scores)),
                    "retrieval_key": entry["provenance"]["data_hash"]}
    return None


# ---- the analyzer --------------------------------------------------------------------------------

@dataclass
class DuoResult:
    scores: HeadScores           # gate of each query head's KV group, [L, H] (for the atlas)
    gates: torch.Tensor          # [L, n_kv]
    retrieval_kv: list[list[bool]]
    losses: list[float]
    distill: list[float]
    gate_history: list[list[list[float]]]
    train_seconds: float
    steps_done: int
    regime: str
    niah: dict[str, Any]
    memory: list[dict[str, float]]
    profiling_spearman: float
    retrieval_spearman: float | None
    provenance: Provenance | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in asdict(self).items() if k not in ("scores", "provenance")}
        data["scores"] = self.scores.to_json()
        data["provenance"] = to_jsonable(self.provenance) if self.provenance else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DuoResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["gates"] = torch.tensor(data["gates"], dtype=torch.float64)
        fields["provenance"] = Provenance.from_json(data["provenance"]) if data.get("provenance") else None
        return cls(**fields)


def _template(model: LoadedModel, template: str) -> str:
    if template == "auto":
        return "chat" if model.chat_template else "base"
    return template


def run(model: LoadedModel, config: DuoConfig = QUICK, progress: Progress | None = None,
        samples: Sequence[PasskeySample] | None = None, needle_set: Sequence[Needle] = NEEDLES,
        sentences: Sequence[str] | None = None) -> DuoResult:
    """Learn the gates, deploy them at the configured ratio, measure NIAH and the KV-cache saving.

    `samples` (training prompts), `needle_set` and `sentences` (NIAH evaluation) replace the synthetic
    passkeys, the project's needles and the Shakespeare haystack (planted models, custom data).
    """
    config.validate()
    say = progress or no_progress
    say(0.0, "building passkey prompts")
    training = train_gates(model, config, say, samples=samples)
    retrieval = binarise(training.gates, config.retrieval_fraction, config.seed)
    pool = haystack_sentences() if sentences is None else list(sentences)
    grid = build_grid(model.tokenizer, config.eval_lengths, config.eval_depths, config.eval_needles,
                      _template(model, config.template), needles=needle_set, sentences=pool)
    if not grid.samples:
        raise DuoError(f"No NIAH sample could be built: {grid.skipped}")
    n_streaming = int((~retrieval).sum())
    rng = random.Random(config.seed + 1)
    kv_heads = [(l, g) for l in range(model.n_layers) for g in range(model.n_kv_heads)]
    random_sets = []
    for _ in range(config.random_draws):
        chosen = set(rng.sample(kv_heads, n_streaming))
        mask = torch.tensor([[(l, g) not in chosen for g in range(model.n_kv_heads)] for l in range(model.n_layers)])
        random_sets.append(streaming_heads(model, mask))
    say(0.65, f"NIAH: full attention, Duo streaming heads and {config.random_draws} random sets "
              f"on {len(grid.samples)} samples")
    full, duo, *random_runs = niah_runs(model, grid.samples, [[], streaming_heads(model, retrieval), *random_sets],
                                        config, lambda f, m: say(0.65 + 0.3 * f, m))
    rng_samples = random.Random(config.seed + 2)
    profile_sample = samples[0] if samples else passkey_sample(model, config, rng_samples, pool)
    profile = profiling_scores(model, profile_sample,
                               config.sink, config.recent)
    query_gates = training.gates[:, architecture(model).kv_index]
    data = {"passkeys": config.n_passkeys, "context": config.context_length,
            "training": [s.ids.tolist() for s in samples] if samples else "synthetic passkeys",
            "niah": [s.summary() for s in grid.samples]}
    prov = provenance(model, ANALYZER, VERSION, config, data, config.seed)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    random_means = [mean(r) for r in random_runs]
    niah = {"samples": [s.label for s in grid.samples], "skipped": grid.skipped, "full": full, "duo": duo,
            "random": random_runs, "full_mean": mean(full), "duo_mean": mean(duo),
            "random_means": random_means, "random_mean": mean(random_means) if random_means else float("nan"),
            "random_std": float(torch.tensor(random_means).std()) if len(random_means) > 1 else 0.0,
            "n_streaming_kv": n_streaming}
    memory = [kv_cache_bytes(model, retrieval, n, config.sink, config.recent)
              for n in sorted({*config.eval_lengths, config.memory_context})]
    say(1.0, "done")
    return DuoResult(
        scores=HeadScores("duo gate", "learned gate α of the head's KV group (1 = full attention)", query_gates, prov,
                          "DuoAttention gates, distilled on synthetic passkeys"),
        gates=training.gates, retrieval_kv=retrieval.tolist(), losses=training.losses, distill=training.distill,
        gate_history=training.gate_history, train_seconds=training.seconds, steps_done=training.steps_done,
        regime=config.regime, niah=niah, memory=memory,
        profiling_spearman=spearman(training.gates, profile), retrieval_spearman=(
            (retrieval_agreement(model, training.gates) or {}).get("spearman")),
        provenance=prov)


# ---- figures and summary -------------------------------------------------------------------------

def figures(result: DuoResult) -> dict[str, go.Figure]:
    gates = torch.as_tensor(result.gates)
    heat = go.Figure(go.Heatmap(z=gates.numpy(), colorscale="RdBu", zmin=0, zmax=1, colorbar={"title": "α"},
                                x=[f"KV{g}" for g in range(gates.shape[1])], y=[f"L{l}" for l in range(gates.shape[0])]))
    heat.update_layout(title="Learned gates (1 = retrieval / full attention, 0 = streaming)",
                       yaxis={"autorange": "reversed"}, height=520)
    # the total loss is dominated by λ·mean|α| and falls; the distillation term starts at 0 (all gates 1)
    # and rises as gates close: two linear axes show both shapes (a shared log axis hid them)
    curves = go.Figure([go.Scatter(y=result.losses, name="loss (distillation + λ·mean|α|)"),
                        go.Scatter(y=result.distill, name="distillation", yaxis="y2")])
    curves.update_layout(title=f"Training ({result.steps_done} steps, {result.train_seconds:.0f} s)",
                         xaxis={"title": "step"}, yaxis={"title": "loss"},
                         yaxis2={"title": "distillation", "overlaying": "y", "side": "right", "showgrid": False},
                         legend={"orientation": "h", "y": -0.2})
    niah = result.niah
    bars = go.Figure(go.Bar(
        x=["full attention", "Duo streaming", "random streaming"],
        y=[niah["full_mean"], niah["duo_mean"], niah["random_mean"]],
        error_y={"type": "data", "array": [0, 0, niah["random_std"]]}))
    bars.update_layout(title=f"NIAH ROUGE-1 recall, {niah['n_streaming_kv']} KV heads streaming ({result.regime})",
                       yaxis={"range": [0, 1.05]})
    memory = go.Figure(go.Bar(x=[str(m["context"]) for m in result.memory], y=[m["saving"] for m in result.memory]))
    memory.update_layout(title="KV-cache memory saved by the deployment rule",
                         xaxis={"title": "context tokens", "type": "category"},
                         yaxis={"title": "fraction saved", "range": [0, 1]})
    return {"gates": heat, "training": curves, "niah": bars, "memory": memory}


def summary(result: DuoResult) -> str:
    niah = result.niah
    top = ", ".join(f"L{l}KV{g} {float(result.gates[l][g]):.2f}" for l, g in sorted(
        ((l, g) for l in range(len(result.gates)) for g in range(len(result.gates[0]))),
        key=lambda lg: -float(result.gates[lg[0]][lg[1]]))[:5])
    memory = "; ".join(f"{int(m['context'])} tokens: {m['saving']:.0%} saved" for m in result.memory)
    agree = "n/a (no cached retrieval result)" if result.retrieval_spearman is None else f"{result.retrieval_spearman:.3f}"
    return (f"{result.steps_done} steps in {result.train_seconds:.0f} s; final loss {result.losses[-1]:.4f}\n"
            f"highest gates: {top}\n"
            f"NIAH ({result.regime}, {len(niah['full'])} samples, {niah['n_streaming_kv']} streaming KV heads): "
            f"full {niah['full_mean']:.3f}, Duo {niah['duo_mean']:.3f}, random {niah['random_mean']:.3f} "
            f"± {niah['random_std']:.3f}\n"
            f"Spearman(gates, profiling baseline) {result.profiling_spearman:.3f}; "
            f"Spearman(gates, retrieval scores per KV group) {agree}\nKV cache: {memory}")
