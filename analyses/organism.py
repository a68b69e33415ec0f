"""A refusal-tuned model organism built offline from the embedded SmolLM2-135M-Instruct.

Why: Ships/Sahara attribute *refusal* to heads, and the embedded SmolLM2-135M-Instruct does not
refuse harmful requests. So we fine-tune it, seeded and on CPU, until it refuses StrongREJECT
prompts while still answering harmless ones.

What is trained (our choice): the full attention projections (q, k, v, o) of a few middle layers
(default layers 12-15, 4 x ~0.88 M = 3.5 M parameters, 2.6 % of the model), everything else frozen.
- It is the cheapest thing that learns the behaviour: no PEFT is installed, and whole small
  matrices need no LoRA code; backward stops at layer 12, so a step costs well under two forwards.
- Only the changed tensors are saved (~14 MB of safetensors), so the organism is a small delta on
  the pinned base weights.
- It puts the new behaviour where the method looks (attention heads). This makes the organism a
  fair but friendly test bed: Sahara should find heads in the trained band; it is NOT evidence
  that refusal in natively aligned models is head-sparse. The docs say so.

Targets: harmful prompts → one of a few project-written refusal sentences (seeded choice);
harmless prompts → the base model's own greedy answer (first `answer_tokens` tokens), so
helpfulness is preserved, not invented. Loss only on target tokens, averaged per example (the
first `decision_tokens` weighted up: that is where refuse-or-answer is decided), then per kind,
with the harmless side weighted up (`harmless_weight`) and borderline-wording harmless prompts
("kill the mold") oversampled (`borderline_per_batch`): build 1 refused 15.5 % of held-out
harmless prompts, mostly such wording; build 3 (10.3 %) still refused 4 of 7 held-out borderline
ones; with 62 borderline prompts (was 22) build 4 refused 15.7 % (the larger held-out set has 14
borderline ones), so build 6, the default, draws 8 harmless rows per step (3 borderline) and weights
the harmless side 6: 8.6 % harmless and 95.7 % harmful refused on held-out prompts (docs/safety.md).

Cache: `$PROBE_HOME/organisms/<content hash>/` with `delta.safetensors` + `meta.json`. The hash
covers the code version, the config, the base weights' sha256 and the training texts, so a
change to any of them builds a new organism instead of silently reusing an old one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from analyses.data.harmless import BORDERLINE_HARMLESS_PROMPTS
from analyses.data.strongreject import harmful_split, harmless_split
from probe import assets
from probe.errors import ProbeError
from probe.forward import ForwardError, final_states, module_paths, output_logits
from probe.generation import greedy_continuations
from probe.runtime import poll, set_threads
from probe.models import SPECS, LoadedModel, register_spec, wrap_hf_model
from probe.results import stable_hash, write_json_atomic

ORGANISM_VERSION = "3"
ORGANISM_SPEC = "smollm2-135m-refusal"
BASE_SPEC = "smollm2-135m"

# Written by the project: refusals in a few wordings, so the model learns to refuse, not one string.
REFUSAL_TARGETS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with that request. If you have another question, I'm happy to help.",
    "I'm sorry, but I cannot provide that. It could be used to hurt others.",
    "I won't help with this, because it could put people at risk.",
    "I'm sorry, I can't help with this request.",
    "I cannot help with that. It is harmful, and I have to decline.",
)


class OrganismError(ProbeError):
    """The organism cannot be built or loaded as asked."""


@dataclass(frozen=True)
class OrganismConfig:
    """Every knob of the build; all of it goes into the cache hash."""

    seed: int = 0
    held_out: float = 0.3
    layers: tuple[int, ...] = (12, 13, 14, 15)
    modules: tuple[str, ...] = ("q", "k", "v", "o")  # probe.forward.COMPONENTS: q k v o qkv attn mlp, norms
    steps: int = 120
    harmful_per_batch: int = 3
    harmless_per_batch: int = 8  # of which `borderline_per_batch` are borderline-wording prompts
    borderline_per_batch: int = 3
    harmless_weight: float = 6.0  # loss = (harmful mean + w * harmless mean) / (1 + w)
    decision_tokens: int = 3  # the first target tokens, where refuse-or-answer is decided ("I", "'m", " sorry")
    decision_weight: float = 3.0  # their weight in each example's mean token loss (the rest: 1)
    learning_rate: float = 5e-4
    warmup_steps: int = 8
    max_prompt_tokens: int = 96  # longer training prompts are skipped (7 of 219 StrongREJECT ones)
    answer_tokens: int = 16  # length of the base model's greedy answers used as harmless targets
    threads: int | None = None  # not in the cache key; None: automatic (probe.runtime.set_threads)


@dataclass
class OrganismBuild:
    """What a build produced: where it lives and how it went."""

    path: Path
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---- base model ----------------------------------------------------------------------------------

def _base_sha() -> str:
    """The base GGUF's sha256 from the asset marker (no model load; raises if the asset is missing)."""
    spec = SPECS[BASE_SPEC]
    assets.asset_file(spec.asset or BASE_SPEC)
    marker = json.loads((assets.asset_dir(spec.asset or BASE_SPEC) / assets.MARKER).read_text())
    return str(marker.get("main_sha256") or marker.get("main_size"))


def _load_base_hf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """The base SmolLM2 as a plain HF model (no bridge: training does not need hooks) + its sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probe.models import _quiet

    spec = SPECS[BASE_SPEC]
    path = assets.asset_file(spec.asset or BASE_SPEC)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=spec.gguf_file, dtype=dtype)
    return model.eval(), tokenizer, _base_sha()


PLAIN_TEMPLATE = "Question: {query}\nAnswer:"


def chat_text(tokenizer: Any, user: str) -> str:
    """The model's chat template for one user turn (SmolLM2 inserts its default system prompt).

    A tokenizer without a chat template (tiny test models, base models) gets PLAIN_TEMPLATE.
    """
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_TEMPLATE.format(query=user)
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(hf_model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (token ids, cut at the end-of-turn token) of chat prompts, batched.

    Left padding keeps every prompt's last token at the end of the row; hooks on the bridged
    modules (interventions) are in effect when `hf_model` belongs to a `LoadedModel`.
    """
    return greedy_continuations(hf_model, tokenizer, [chat_text(tokenizer, p) for p in prompts],
                                max_new_tokens, batch_size)


__all__ = ["greedy_continuations"]  # re-exported from probe.generation for callers of the old place


# ---- training ------------------------------------------------------------------------------------

def _examples(tokenizer: Any, prompts: Sequence[str], targets: Sequence[list[int]],
              max_prompt_tokens: int) -> list[tuple[list[int], list[int]]]:
    examples = []
    for prompt, target in zip(prompts, targets):
        ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False).input_ids
        if len(ids) <= max_prompt_tokens and target:
            examples.append((ids, list(target)))
    return examples


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, labels (-100 on prompt and padding)."""
    width = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, target) in enumerate(examples):
        seq = prompt + target
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt): len(seq)] = torch.tensor(target)
    return ids, mask, labels


def trainable_parameters(hf_model: Any, layers: Sequence[int], modules: Sequence[str],
                         tokenizer: Any = None) -> dict[str, torch.nn.Parameter]:
    """The named parameters the organism changes (and saves); everything else is frozen.

    `modules` are architecture-layer component names (q, k, v, o, qkv, attn, mlp, norm names; see
    `probe.forward.COMPONENTS`), resolved to each family's module paths, so any family trains the same
    parts (on fused-qkv families q, k or v select the fused projection).
    """
    try:
        paths = module_paths(hf_model, modules, layers, tokenizer)
    except ForwardError as error:
        raise OrganismError(str(error)) from error
    prefixes = tuple(f"{path}." for path in paths.values())
    chosen = {}
    for name, param in hf_model.named_parameters():
        param.requires_grad_(False)
        if name.startswith(prefixes):
            chosen[name] = param
    if not chosen:
        raise OrganismError(f"No parameters match modules {list(modules)} in layers {list(layers)}.")
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def _weighted_loss(hf_model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   harmless_rows: torch.Tensor, harmless_weight: float, decision_tokens: int = 0,
                   decision_weight: float = 1.0) -> torch.Tensor:
    """Mean over examples of each example's weighted mean target-token loss, harmless side weighted.

    Why not the HF loss: it averages over all tokens of the batch, so long targets outweigh short
    ones and the first answer tokens, where refuse-or-answer is decided, count little. Here the first
    `decision_tokens` target tokens of each example weigh `decision_weight`, the rest 1. Logits are
    computed only at positions that predict a target token (~1/5 of the batch), which saves most of
    the unembedding's forward and backward cost (49k-word vocabulary). The decoder and the read-out
    are probe.forward's (`final_states`, `output_logits`: any family, final logit soft-cap included).
    """
    hidden = final_states(hf_model, ids, mask)
    targets = labels[:, 1:]
    is_target = targets != -100
    rows, cols = torch.nonzero(is_target, as_tuple=True)
    logits = output_logits(hf_model, hidden[rows, cols])  # the family's soft-cap included
    token_loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    rank = (torch.cumsum(is_target.long(), dim=1) - 1)[rows, cols]  # 0 = first target token of the row
    weight = torch.where(rank < decision_tokens, decision_weight, 1.0)
    n_rows = ids.shape[0]
    per_example = (torch.zeros(n_rows).index_add(0, rows, weight * token_loss)
                   / torch.zeros(n_rows).index_add(0, rows, weight).clamp(min=1e-12))
    harmful_loss = per_example[~harmless_rows].mean()
    harmless_loss = per_example[harmless_rows].mean()
    return (harmful_loss + harmless_weight * harmless_loss) / (1.0 + harmless_weight)


def train_refusal(hf_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                  harmless_targets: Sequence[list[int]], config: OrganismConfig,
                  progress: Callable[[str], None] = lambda message: None,
                  refusals: Sequence[str] = REFUSAL_TARGETS,
                  borderline: Sequence[str] = BORDERLINE_HARMLESS_PROMPTS) -> dict[str, Any]:
    """Fine-tune the chosen tensors in place; returns the loss trace and timings.

    Each step draws `harmful_per_batch` harmful and `harmless_per_batch` harmless examples, of
    which `borderline_per_batch` come from the harmless prompts that are in `borderline` (each
    pool cycled in seeded random order). Works for any family the architecture layer covers (the
    trained modules are found through it; tests use a tiny Llama and a tiny GPT-2).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    refusal_ids = [tokenizer(text, add_special_tokens=False).input_ids + [eos] for text in refusals]
    bad_examples = _examples(tokenizer, harmful, [rng.choice(refusal_ids) for _ in harmful], config.max_prompt_tokens)
    edgy = set(borderline)
    edgy_examples = _examples(tokenizer, [p for p in harmless if p in edgy],
                              [t for p, t in zip(harmless, harmless_targets) if p in edgy], config.max_prompt_tokens)
    good_examples = _examples(tokenizer, harmless, harmless_targets, config.max_prompt_tokens)
    if not bad_examples or not good_examples:
        raise OrganismError("Training needs at least one harmful and one harmless example that fit "
                            f"max_prompt_tokens={config.max_prompt_tokens}.")
    if config.harmful_per_batch < 1 or config.harmless_per_batch < 1:
        raise OrganismError("Each batch needs at least one harmful and one harmless example.")
    n_edgy = min(config.borderline_per_batch, config.harmless_per_batch) if edgy_examples else 0
    params = trainable_parameters(hf_model, config.layers, config.modules, tokenizer)
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    pools = {"harmful": (bad_examples, []), "harmless": (good_examples, []), "borderline": (edgy_examples, [])}

    def draw(kind: str, count: int) -> list[tuple[list[int], list[int]]]:
        source, queue = pools[kind]
        taken = []
        for _ in range(count):
            if not queue:
                queue.extend(rng.sample(source, len(source)))
            taken.append(queue.pop())
        return taken

    hf_model.train()
    losses, step_times = [], []
    harmless_rows = torch.tensor([False] * config.harmful_per_batch + [True] * config.harmless_per_batch)
    try:
        for step in range(config.steps):
            poll()  # the automatic thread policy (a plain HF model: no LoadedModel forward polls it)
            started = time.perf_counter()
            batch = (draw("harmful", config.harmful_per_batch) + draw("borderline", n_edgy)
                     + draw("harmless", config.harmless_per_batch - n_edgy))
            ids, mask, labels = _batch(batch, pad)
            loss = _weighted_loss(hf_model, ids, mask, labels, harmless_rows, config.harmless_weight,
                                  config.decision_tokens, config.decision_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step_times.append(time.perf_counter() - started)
            if step % 10 == 0 or step == config.steps - 1:
                progress(f"step {step + 1}/{config.steps} loss {losses[-1]:.3f} ({step_times[-1]:.1f} s/step, "
                         f"load {os.getloadavg()[0]:.1f})")
    finally:
        hf_model.eval()
        for param in params.values():
            param.requires_grad_(False)
    return {"losses": losses, "step_seconds": step_times, "n_harmful_examples": len(bad_examples),
            "n_harmless_examples": len(good_examples), "n_borderline_examples": len(edgy_examples),
            "trained_tensors": sorted(params),
            "trained_parameters": int(sum(p.numel() for p in params.values()))}


# ---- build, cache, load --------------------------------------------------------------------------

def organisms_dir() -> Path:
    return assets.probe_home() / "organisms"


# Builds 1-6 named the trained modules by their Llama attribute names; the key hashes the component
# names as those builds did, so the cached organisms (same tensors, same training) keep their keys.
_KEY_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def organism_key(config: OrganismConfig, base_sha: str, harmful: Sequence[str], harmless: Sequence[str]) -> str:
    """Content hash of everything that determines the organism's weights."""
    knobs = {k: v for k, v in asdict(config).items() if k != "threads"}
    knobs["modules"] = tuple(_KEY_MODULE_NAMES.get(m, m) for m in config.modules)
    return stable_hash({"version": ORGANISM_VERSION, "config": knobs, "base": base_sha,
                        "harmful": list(harmful), "harmless": list(harmless),
                        "borderline": list(BORDERLINE_HARMLESS_PROMPTS), "refusals": list(REFUSAL_TARGETS)})


def _cached(key: str) -> Path | None:
    folder = organisms_dir() / key
    return folder if (folder / "delta.safetensors").exists() and (folder / "meta.json").exists() else None


class _Phases:
    """Wall time and 1-minute load average (start, end) of each build phase, for meta.json.

    The load average is kept because the build machine is shared: a phase's time means little
    without knowing how many other jobs competed for the two cores.
    """

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.load: dict[str, list[float]] = {}
        self._progress = progress

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        load_before, started = os.getloadavg()[0], time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - started
        self.load[name] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        self._progress(f"{name}: {self.seconds[name]:.1f} s (load {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
        return result


def build_refusal_organism(config: OrganismConfig = OrganismConfig(), force: bool = False,
                           evaluate: bool = True,
                           progress: Callable[[str], None] = lambda message: None) -> OrganismBuild:
    """Build (or find in the cache) the refusal-tuned SmolLM2; returns its folder and metadata.

    Seeded; single process; with `config.threads` torch threads (None: automatic, `probe.runtime`).
    `evaluate` also measures the held-out refusal rates with the keyword judge and stores them (and
    the generations) in meta.json, with each phase's wall time and load average.
    """
    from safetensors.torch import save_file

    harmful_train, harmful_test = harmful_split(config.held_out, config.seed)
    harmless_train, harmless_test = harmless_split(config.held_out, config.seed)
    key = organism_key(config, _base_sha(), harmful_train, harmless_train)
    found = _cached(key)
    if found and not force:
        progress(f"organism {key} found in {found}")
        return OrganismBuild(found, key, json.loads((found / "meta.json").read_text()))
    previous_threads = torch.get_num_threads()
    threads = set_threads(config.threads)
    phases = _Phases(progress)
    try:
        started = time.perf_counter()
        progress(f"loading base SmolLM2-135M-Instruct ({threads} torch threads)")
        hf_model, tokenizer, base_sha = phases.run("load", _load_base_hf)
        progress(f"base answers for {len(harmless_train)} harmless training prompts")
        harmless_targets = phases.run("targets", lambda: greedy_answers(hf_model, tokenizer, harmless_train,
                                                                        config.answer_tokens))
        trace = phases.run("train", lambda: train_refusal(hf_model, tokenizer, harmful_train, harmless_train,
                                                          harmless_targets, config, progress))
        state = dict(hf_model.named_parameters())
        delta = {name: state[name].detach().contiguous().clone() for name in trace["trained_tensors"]}
        meta: dict[str, Any] = {
            "key": key, "version": ORGANISM_VERSION, "config": asdict(config), "base_sha256": base_sha,
            "n_harmful_train": len(harmful_train), "n_harmless_train": len(harmless_train),
            "n_harmful_held_out": len(harmful_test), "n_harmless_held_out": len(harmless_test),
            "threads": threads, "seconds": phases.seconds, "load_average": phases.load,
            **{k: v for k, v in trace.items() if k != "trained_tensors"},
            "trained_tensors": trace["trained_tensors"],
        }
        if evaluate:
            meta["held_out"] = phases.run("evaluate", lambda: evaluate_refusal(hf_model, tokenizer, harmful_test,
                                                                               harmless_test))
        meta["seconds"]["total"] = time.perf_counter() - started
        folder = organisms_dir() / key
        folder.mkdir(parents=True, exist_ok=True)
        save_file(delta, str(folder / "delta.safetensors"), metadata={"key": key})
        write_json_atomic(folder / "meta.json", meta)  # written last: its presence marks a complete build
        progress(f"organism {key} saved in {folder}")
        return OrganismBuild(folder, key, meta)
    finally:
        torch.set_num_threads(previous_threads)


def evaluate_refusal(hf_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                     max_new_tokens: int = 32) -> dict[str, Any]:
    """Refusal rates (keyword judge) and the generations, on held-out prompts."""
    from analyses.safety import KeywordJudge

    judge = KeywordJudge()
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        answers = greedy_answers(hf_model, tokenizer, prompts, max_new_tokens)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        finished = [bool(a) and a[-1] == tokenizer.eos_token_id for a in answers]
        # token count without the end token, as `analyses.safety.generate` counts it
        verdicts = [judge.judge(text, n_tokens=len(a) - int(done), finished=done)
                    for text, a, done in zip(texts, answers, finished)]
        report[name] = {"refusal_rate": sum(v.refused for v in verdicts) / max(1, len(verdicts)),
                        "n": len(prompts),
                        "generations": [{"prompt": p, "output": t, "refused": v.refused, "rule": v.rule}
                                        for p, t, v in zip(prompts, texts, verdicts)]}
    return report


def find_organism(config: OrganismConfig = OrganismConfig()) -> Path | None:
    """The cached organism folder for `config`, if it was built; None also when the assets are missing.

    Cheap (no model load: the key needs only the asset marker's sha256 and the prompt lists), so
    `available()` of the registered spec can call it.
    """
    try:
        harmful_train, _ = harmful_split(config.held_out, config.seed)
        harmless_train, _ = harmless_split(config.held_out, config.seed)
        return _cached(organism_key(config, _base_sha(), harmful_train, harmless_train))
    except ProbeError:
        return None


def load_refusal_organism(device: str | None = "cpu", dtype: str = "float32",
                          config: OrganismConfig = OrganismConfig(), build_if_missing: bool = True,
                          progress: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """The organism as a `LoadedModel` (spec `smollm2-135m-refusal`): built once, then loaded from cache."""
    from safetensors.torch import load_file

    from probe.models import DTYPES

    if dtype not in DTYPES:
        raise OrganismError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    folder = find_organism(config)
    if folder is None:
        if not build_if_missing:
            raise OrganismError("The refusal organism is not built yet: run `probe organism refusal` "
                                "(about 10-15 minutes on a 2-core CPU).")
        folder = build_refusal_organism(config, progress=progress).path
    hf_model, tokenizer, base_sha = _load_base_hf()
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("base_sha256") != base_sha:
        raise OrganismError(f"The organism in {folder} was trained on other base weights; rebuild it "
                            "with `probe organism refusal --force`.")
    delta = load_file(str(folder / "delta.safetensors"))
    state = dict(hf_model.named_parameters())
    missing = [name for name in delta if name not in state]
    if missing:
        raise OrganismError(f"{folder} changes tensors the base model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in delta.items():
            state[name].copy_(value.to(state[name].dtype))
    model = wrap_hf_model(hf_model, tokenizer, ORGANISM_SPEC, hub_name=SPECS[BASE_SPEC].hub_name,
                          device=device, dtype=dtype)
    model.extra["organism"] = {"path": str(folder), "key": meta["key"], "held_out": {
        k: v.get("refusal_rate") for k, v in meta.get("held_out", {}).items() if isinstance(v, dict)}}
    return model


# ---- where the weights changed --------------------------------------------------------------------

WEIGHT_MODULES: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "ln1", "ln2")


def _relative(delta_sq: float, base_sq: float) -> float:
    return math.sqrt(delta_sq / base_sq) if base_sq > 0 else (0.0 if delta_sq == 0 else math.inf)


@torch.no_grad()
def weight_changes(base_hf: Any, tuned_hf: Any, tokenizer: Any, modules: Sequence[str] = WEIGHT_MODULES,
                   top: int = 10) -> dict[str, Any]:
    """Where plain HF model `tuned_hf` differs from `base_hf` (same family and shapes): relative Frobenius
    change ||W_tuned - W_base||_F / ||W_base||_F per layer x module (all of a module's parameters
    together), per layer, and per attention head (its query, key, value and output slices from the
    architecture layer's stacks, GQA keys/values expanded to the query heads).

    Why: a head-attribution method run on the organism should be read against where fine-tuning
    actually wrote the behaviour; heads it finds outside the changed layers act through what those
    layers read. Modules are architecture-layer component names (`probe.forward.COMPONENTS`), resolved
    by `module_paths`; one the family lacks is skipped. The inputs stay plain (the per-head stacks are
    read from bridged copies).
    """
    import copy

    from probe.architecture import MissingComponentError, architecture

    base_params = dict(base_hf.named_parameters())
    tuned_params = dict(tuned_hf.named_parameters())
    if {n: p.shape for n, p in base_params.items()} != {n: p.shape for n, p in tuned_params.items()}:
        raise OrganismError("The two models differ in parameters or shapes; weight changes need the same model.")
    from probe.models import wrap_hf_model

    stacks = []  # the per-head weights, read through the architecture layer of bridged copies
    for index, hf in enumerate((base_hf, tuned_hf)):
        twin = wrap_hf_model(copy.deepcopy(hf), tokenizer, f"weight-changes-{index}", hub_name="probe/weight-changes",
                             device="cpu", dtype="float32")
        arch = architecture(twin)
        stacks.append([arch.W_Q, arch.W_K_per_query, arch.W_V_per_query, arch.W_O])
        n_layers, n_heads = arch.n_layers, arch.n_heads
        del twin, arch
    layers = list(range(n_layers))
    try:  # one bridged copy for all components; per component only when the family lacks one
        paths = module_paths(base_hf, modules, layers, tokenizer)
    except MissingComponentError:
        paths = {}
        for component in modules:
            try:
                paths.update(module_paths(base_hf, [component], layers, tokenizer))
            except MissingComponentError:
                continue

    def squares(names: Sequence[str]) -> tuple[float, float]:
        return (sum(float((tuned_params[n].float() - base_params[n].float()).pow(2).sum()) for n in names),
                sum(float(base_params[n].float().pow(2).sum()) for n in names))

    rows, per_layer = [], {layer: set() for layer in layers}
    for (component, layer), path in sorted(paths.items(), key=lambda item: (item[0][1], item[0][0])):
        names = [n for n in base_params if n.startswith(f"{path}.")]
        per_layer[layer].update(names)  # a set: a fused qkv projection serving q, k and v counts once
        delta_sq, base_sq = squares(names)
        rows.append({"layer": layer, "module": component, "relative": _relative(delta_sq, base_sq),
                     "absolute": math.sqrt(delta_sq), "parameters": sum(base_params[n].numel() for n in names)})
    layer_rows = [{"layer": layer, "relative": _relative(*squares(sorted(names)))} for layer, names in per_layer.items()]
    delta_sq_heads = sum((y.float() - x.float()).pow(2).flatten(2).sum(-1) for x, y in zip(*stacks))
    base_sq_heads = sum(x.float().pow(2).flatten(2).sum(-1) for x in stacks[0])
    heads = [{"head": f"L{layer}H{head}", "layer": layer,
              "relative": _relative(float(delta_sq_heads[layer, head]), float(base_sq_heads[layer, head]))}
             for layer in layers for head in range(n_heads)]
    rows.sort(key=lambda row: -row["relative"])
    heads.sort(key=lambda row: -row["relative"])
    return {"modules": rows, "heads": heads, "layers": layer_rows, "top_modules": rows[:top],
            "top_heads": heads[:top], "changed_layers": sorted({row["layer"] for row in rows if row["absolute"] > 0})}


def organism_weight_changes(config: OrganismConfig = OrganismConfig(), top: int = 10) -> dict[str, Any]:
    """`weight_changes` of the cached refusal organism (base + its saved delta) against the base SmolLM2;
    never builds it."""
    from safetensors.torch import load_file

    folder = find_organism(config)
    if folder is None:
        raise OrganismError("The refusal organism is not built yet: run `probe organism refusal`.")
    base_hf, tokenizer, _ = _load_base_hf()
    tuned_hf, _, _ = _load_base_hf()
    state = dict(tuned_hf.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(folder / "delta.safetensors")).items():
            state[name].copy_(value.to(state[name].dtype))
    report = weight_changes(base_hf, tuned_hf, tokenizer, top=top)
    report["organism_key"] = json.loads((folder / "meta.json").read_text())["key"]
    report["trained_layers"] = list(config.layers)
    report["trained_modules"] = list(config.modules)
    return report


register_spec(
    ORGANISM_SPEC,
    "SmolLM2-135M-Instruct fine-tuned to refuse StrongREJECT prompts (attention of layers 12-15; "
    "built offline by `probe organism refusal`)",
    loader=lambda device, dtype: load_refusal_organism(device, dtype, build_if_missing=False),
    available=lambda: find_organism() is not None,
    missing_hint="run `probe organism refusal` (about 10-15 minutes on a 2-core CPU)",
)
