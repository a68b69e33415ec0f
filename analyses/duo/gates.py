"""The gated student and its training: per-KV-head gates blend full and streaming attention, trained by
distillation on the frozen model's final states (the authors' two-way forward)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analyses.common import Progress, no_progress
from analyses.duo.config import DuoConfig
from analyses.duo.passkeys import PasskeySample, sample_stream
from probe.architecture import architecture
from probe.forward import forward_for_hooks
from probe.interventions import Intervention, intervene, streaming_attention, streaming_mask, z_capture_hooks
from probe.models import LoadedModel
from probe.readout import apply_final_norm
from probe.runtime import release_free_memory


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
    """The authors' gated student (`full_branch="teacher"`): every head's attention restricted to sink ∪
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
def distillation_states(model: LoadedModel, ids: torch.Tensor,
                        hooks: list[tuple[str, Any]] | None = None) -> torch.Tensor:
    """The hidden states after the final norm, its weight included (`probe.readout.apply_final_norm`, the
    authors' distillation target), `[T, d_model]`, under `hooks` and the open `intervene()` blocks (on
    the fused path where they allow it)."""
    captured: dict[str, torch.Tensor] = {}
    with model.hooks(list(hooks or []) + [_final_residual_hook(captured)]), forward_for_hooks(model) as run:
        run(ids)
    return apply_final_norm(model, captured["resid"])[0]


@dataclass(frozen=True)
class Teacher:
    """The frozen full model on one sample: final states at the loss positions and every layer's z."""

    states: torch.Tensor            # [n, d_model]
    z: list[torch.Tensor]           # per layer [1, T, H, d_head]


@torch.no_grad()
def teacher_run(model: LoadedModel, sample: PasskeySample) -> Teacher:
    """One plain forward (no gradient): the distillation target and the full branch's head outputs."""
    hooks, z = z_capture_hooks(range(model.n_layers))
    states = distillation_states(model, sample.ids, hooks)
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
        student = apply_final_norm(model, captured["resid"])[0]
        distill = (student[sample.loss_positions] - teacher.states).pow(2).mean(-1).mean()
        loss = distill + config.reg_weight * gates.clamp(0, 1).abs().mean()
        if loss.requires_grad:
            loss.backward()  # hooks and path stay in place: recomputed layers run them again
    return distill.detach(), loss.detach()


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
    """Optimise the gates (AdamW, linear warm-up/decay as the authors' code), model weights frozen."""
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
