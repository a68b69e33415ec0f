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
helpfulness is preserved, not invented. Loss only on target tokens.

Cache: `$PROBE_HOME/organisms/<content hash>/` with `delta.safetensors` + `meta.json`. The hash
covers the code version, the config, the base weights' sha256 and the training texts, so a
change to any of them builds a new organism instead of silently reusing an old one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from analyses.data.strongreject import harmful_split, harmless_split
from probe import assets
from probe.errors import ProbeError
from probe.models import SPECS, LoadedModel, wrap_hf_model
from probe.results import stable_hash, write_json_atomic

ORGANISM_VERSION = "1"
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
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 60
    batch_size: int = 8  # half harmful, half harmless
    learning_rate: float = 5e-4
    warmup_steps: int = 5
    max_prompt_tokens: int = 128  # longer training prompts are skipped (a few StrongREJECT ones)
    answer_tokens: int = 24  # length of the base model's greedy answers used as harmless targets
    threads: int = 1  # not part of the cache key; 1 is much faster than 2 on a CPU shared with others


@dataclass
class OrganismBuild:
    """What a build produced: where it lives and how it went."""

    path: Path
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---- base model ----------------------------------------------------------------------------------

def _load_base_hf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """The base SmolLM2 as a plain HF model (no bridge: training does not need hooks) + its sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probe.models import _quiet

    spec = SPECS[BASE_SPEC]
    path = assets.asset_file(spec.asset or BASE_SPEC)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=spec.gguf_file, dtype=dtype)
    marker = json.loads((assets.asset_dir(spec.asset or BASE_SPEC) / assets.MARKER).read_text())
    return model.eval(), tokenizer, str(marker.get("main_sha256") or marker.get("main_size"))


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


@torch.no_grad()
def greedy_continuations(hf_model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 16, add_special_tokens: bool = False) -> list[list[int]]:
    """Greedy continuations of already rendered prompt texts (left-padded batches, KV cache)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=add_special_tokens).input_ids
                   for t in texts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        device = next(hf_model.parameters()).device
        generated = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                      eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        for row in generated[:, width:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


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


def trainable_parameters(hf_model: Any, layers: Sequence[int], modules: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The named parameters the organism changes (and saves); everything else is frozen."""
    n_layers = hf_model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise OrganismError(f"Layers {bad} do not exist; the model has {n_layers} layers.")
    chosen = {}
    for name, param in hf_model.named_parameters():
        param.requires_grad_(False)
        parts = name.split(".")
        if "layers" in parts:
            layer = int(parts[parts.index("layers") + 1])
            if layer in layers and any(f".{m}." in name for m in modules):
                chosen[name] = param
    if not chosen:
        raise OrganismError(f"No parameters match modules {list(modules)} in layers {list(layers)}.")
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def train_refusal(hf_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                  harmless_targets: Sequence[list[int]], config: OrganismConfig,
                  progress: Callable[[str], None] = lambda message: None,
                  refusals: Sequence[str] = REFUSAL_TARGETS) -> dict[str, Any]:
    """Fine-tune the chosen tensors in place; returns the loss trace and timings.

    Works for any HF causal LM with `model.layers.N.*` parameter names (tests use a tiny Llama).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    refusal_ids = [tokenizer(text, add_special_tokens=False).input_ids + [eos] for text in refusals]
    bad_examples = _examples(tokenizer, harmful, [rng.choice(refusal_ids) for _ in harmful], config.max_prompt_tokens)
    good_examples = _examples(tokenizer, harmless, harmless_targets, config.max_prompt_tokens)
    if not bad_examples or not good_examples:
        raise OrganismError("Training needs at least one harmful and one harmless example that fit "
                            f"max_prompt_tokens={config.max_prompt_tokens}.")
    params = trainable_parameters(hf_model, config.layers, config.modules)
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    pools = {"harmful": (bad_examples, []), "harmless": (good_examples, [])}

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
    half = max(1, config.batch_size // 2)
    try:
        for step in range(config.steps):
            started = time.perf_counter()
            batch = draw("harmful", half) + draw("harmless", config.batch_size - half)
            ids, mask, labels = _batch(batch, pad)
            loss = hf_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step_times.append(time.perf_counter() - started)
            if step % 10 == 0 or step == config.steps - 1:
                progress(f"step {step + 1}/{config.steps} loss {losses[-1]:.3f} ({step_times[-1]:.1f} s/step)")
    finally:
        hf_model.eval()
        for param in params.values():
            param.requires_grad_(False)
    return {"losses": losses, "step_seconds": step_times, "n_harmful_examples": len(bad_examples),
            "n_harmless_examples": len(good_examples), "trained_tensors": sorted(params),
            "trained_parameters": int(sum(p.numel() for p in params.values()))}


# ---- build, cache, load --------------------------------------------------------------------------

def organisms_dir() -> Path:
    return assets.probe_home() / "organisms"


def organism_key(config: OrganismConfig, base_sha: str, harmful: Sequence[str], harmless: Sequence[str]) -> str:
    """Content hash of everything that determines the organism's weights."""
    knobs = {k: v for k, v in asdict(config).items() if k != "threads"}
    return stable_hash({"version": ORGANISM_VERSION, "config": knobs, "base": base_sha,
                        "harmful": list(harmful), "harmless": list(harmless),
                        "refusals": list(REFUSAL_TARGETS)})


def _cached(key: str) -> Path | None:
    folder = organisms_dir() / key
    return folder if (folder / "delta.safetensors").exists() and (folder / "meta.json").exists() else None


def build_refusal_organism(config: OrganismConfig = OrganismConfig(), force: bool = False,
                           evaluate: bool = True,
                           progress: Callable[[str], None] = lambda message: None) -> OrganismBuild:
    """Build (or find in the cache) the refusal-tuned SmolLM2; returns its folder and metadata.

    Seeded; single process; with `config.threads` torch threads. `evaluate` also measures the
    held-out refusal rates with the keyword judge and stores them (and the generations) in meta.json.
    """
    from safetensors.torch import save_file

    harmful_train, harmful_test = harmful_split(config.held_out, config.seed)
    harmless_train, harmless_test = harmless_split(config.held_out, config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        started = time.perf_counter()
        progress("loading base SmolLM2-135M-Instruct")
        hf_model, tokenizer, base_sha = _load_base_hf()
        key = organism_key(config, base_sha, harmful_train, harmless_train)
        found = _cached(key)
        if found and not force:
            progress(f"organism {key} found in {found}")
            return OrganismBuild(found, key, json.loads((found / "meta.json").read_text()))
        load_seconds = time.perf_counter() - started
        progress(f"base answers for {len(harmless_train)} harmless training prompts")
        t0 = time.perf_counter()
        harmless_targets = greedy_answers(hf_model, tokenizer, harmless_train, config.answer_tokens)
        target_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        trace = train_refusal(hf_model, tokenizer, harmful_train, harmless_train, harmless_targets, config, progress)
        train_seconds = time.perf_counter() - t0
        state = dict(hf_model.named_parameters())
        delta = {name: state[name].detach().contiguous().clone() for name in trace["trained_tensors"]}
        folder = organisms_dir() / key
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "key": key, "version": ORGANISM_VERSION, "config": asdict(config), "base_sha256": base_sha,
            "n_harmful_train": len(harmful_train), "n_harmless_train": len(harmless_train),
            "n_harmful_held_out": len(harmful_test), "n_harmless_held_out": len(harmless_test),
            "threads": config.threads, "seconds": {"load": load_seconds, "targets": target_seconds,
                                                   "train": train_seconds},
            **{k: v for k, v in trace.items() if k != "trained_tensors"},
            "trained_tensors": trace["trained_tensors"],
        }
        if evaluate:
            t0 = time.perf_counter()
            meta["held_out"] = evaluate_refusal(hf_model, tokenizer, harmful_test, harmless_test)
            meta["seconds"]["evaluate"] = time.perf_counter() - t0
        meta["seconds"]["total"] = time.perf_counter() - started
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
        verdicts = [judge.judge(text, n_tokens=len(a), finished=bool(a) and a[-1] == tokenizer.eos_token_id)
                    for text, a in zip(texts, answers)]
        report[name] = {"refusal_rate": sum(v.refused for v in verdicts) / max(1, len(verdicts)),
                        "n": len(prompts),
                        "generations": [{"prompt": p, "output": t, "refused": v.refused, "rule": v.rule}
                                        for p, t, v in zip(prompts, texts, verdicts)]}
    return report


def find_organism(config: OrganismConfig = OrganismConfig()) -> Path | None:
    """The cached organism folder for `config`, if it was built (reads meta only, no model load)."""
    folder = organisms_dir()
    if not folder.exists():
        return None
    wanted = {k: v for k, v in asdict(config).items() if k != "threads"}
    for meta_path in sorted(folder.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        stored = {k: v for k, v in meta.get("config", {}).items() if k != "threads"}
        if meta.get("version") == ORGANISM_VERSION and _same_config(stored, wanted):
            if (meta_path.parent / "delta.safetensors").exists():
                return meta_path.parent
    return None


def _same_config(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return json.loads(json.dumps(stored)) == json.loads(json.dumps(wanted))


def load_refusal_organism(device: str | None = "cpu", dtype: str = "float32",
                          config: OrganismConfig = OrganismConfig(), build_if_missing: bool = True,
                          progress: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """The organism as a `LoadedModel` (spec `smollm2-135m-refusal`): built once, then loaded from cache."""
    from safetensors.torch import load_file

    from probe.models import DTYPES

    if dtype not in DTYPES:
        raise OrganismError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    build = None
    folder = find_organism(config)
    if folder is None:
        if not build_if_missing:
            raise OrganismError("The refusal organism is not built yet: run `probe organism refusal` "
                                "(about 15 minutes on a 2-core CPU).")
        build = build_refusal_organism(config, progress=progress)
        folder = build.path
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
