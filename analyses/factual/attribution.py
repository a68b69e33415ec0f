"""Direct logit attribution of d = logit(in-context) - logit(memorised) to every head (the fast path,
all heads in one cached pass), and its slow reference by direct-path patching."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyses.data.counterfactual import CounterfactualPrompt
from analyses.factual.config import FactualError
from analyses.factual.prompts import _groups
from probe.architecture import Norm, architecture
from probe.heads import Head
from probe.models import LoadedModel
from probe.readout import frozen_final_norm


def _post_attention_norm(model: LoadedModel, layer: int) -> Norm | None:
    """The norm on the attention output before it joins the residual stream (Gemma 2/3, OLMo-2), if any."""
    return architecture(model).norm("ln1_post", layer)


def _hook_names(model: LoadedModel) -> set[str]:
    names = {f"blocks.{l}.attn.hook_z" for l in range(model.n_layers)} | {"ln_final.hook_scale"}
    for layer in range(model.n_layers):
        if _post_attention_norm(model, layer) is not None:
            names.add(f"blocks.{layer}.ln1_post.hook_scale")
    return names


@dataclass
class Attribution:
    """Per prompt and head: the head's direct effect on d = logit(in-context) - logit(memorised)."""

    per_prompt: torch.Tensor  # [n_prompts, n_layers, n_heads]
    clean_diff: torch.Tensor  # [n_prompts] d from the real logits

    @property
    def mean(self) -> torch.Tensor:
        return self.per_prompt.mean(0)


@torch.no_grad()
def head_attribution(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], batch_size: int = 32) -> Attribution:
    """All heads in one cached pass per batch (the fast path).

    DLA_lh = post_gain_l * (z_lh W_O[l,h]) / post_scale_l   (Gemma's post-attention norm, frozen)
             -> centred if the final norm centres (LayerNorm)
             -> * final_gain / final_scale                   (final norm, frozen from the clean run)
             . (W_U[:, in-context first token] - W_U[:, memorised first token])
    """
    counterfactual = [p for p in prompts if p.is_counterfactual]
    if len(counterfactual) != len(prompts):
        raise FactualError("Attribution needs counterfactual prompts (a context city to compare against).")
    arch = architecture(model)
    W_O = arch.W_O.to(torch.float64)  # [L, H, d_head, d_model]
    post = {}
    for layer in range(model.n_layers):
        norm = _post_attention_norm(model, layer)
        if norm is not None:
            if norm.kind != "rms":
                raise FactualError(f"{arch.name}: a {norm.kind} post-attention norm is not supported by the attribution.")
            post[layer] = norm.weight.to(W_O.device, torch.float64)
    names = _hook_names(model)
    per_prompt = torch.zeros(len(prompts), model.n_layers, model.n_heads, dtype=torch.float64)
    clean = torch.zeros(len(prompts), dtype=torch.float64)
    for indices, ids in _groups(prompts, model, batch_size):
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][:, -1].to(W_O.device) for l in range(model.n_layers)], 1)
        out = torch.einsum("blhd,lhdm->blhm", z.to(torch.float64), W_O)
        for layer, gain in post.items():
            post_scale = cache[f"blocks.{layer}.ln1_post.hook_scale"][:, -1].to(out.device, torch.float64)  # [b, 1]
            out[:, layer] = out[:, layer] * gain / post_scale[:, None, :]
        final_scale = cache["ln_final.hook_scale"][:, -1].to(out.device, torch.float64)  # [b, 1]
        out = frozen_final_norm(model, out, final_scale[:, None, None, :])  # centred for LayerNorm, x gain / scale
        rows = [prompts[i] for i in indices]
        columns = arch.W_U_columns([t for p in rows for t in (p.in_context_token, p.memorised_token)])
        direction = (columns[:, 0::2] - columns[:, 1::2]).T.to(torch.float64)  # [b, d_model]
        per_prompt[indices] = torch.einsum("blhm,bm->blh", out, direction)
        last = logits[:, -1].to(torch.float64)
        clean[indices] = torch.stack([last[r, p.in_context_token] - last[r, p.memorised_token]
                                      for r, p in enumerate(rows)])
    return Attribution(per_prompt, clean)


@torch.no_grad()
def reference_direct_effect(model: LoadedModel, prompt: CounterfactualPrompt, head: Head) -> float:
    """Slow reference: one forward pass per head with hooks, no W_O, gains or einsums of our own.

    The head's z is zeroed at the last position; every later component's output at that position is
    patched back to its clean value (so only the direct path changes); the post-attention norm scale
    (Gemma) and the final norm scale are written back to their clean values (frozen). The direct
    effect is clean d minus the d of that run, d read from the final norm's own output (`ln_final.hook_out`)
    through the two unembedding columns: before any final logit soft-cap (Gemma 2), which is not linear
    in a head's contribution (the unembedding bias cancels in the difference).
    """
    ids = model.encode(prompt.text)
    layer = head.layer
    later = [f"blocks.{k}.hook_mlp_out" for k in range(layer, model.n_layers)]
    later += [f"blocks.{k}.hook_attn_out" for k in range(layer + 1, model.n_layers)]
    frozen = ["ln_final.hook_scale"]
    if _post_attention_norm(model, layer) is not None:
        frozen.append(f"blocks.{layer}.ln1_post.hook_scale")
    keep = set(later + frozen) | {"ln_final.hook_out"}
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name in keep)
    columns = architecture(model).W_U_columns([prompt.in_context_token, prompt.memorised_token]).to(torch.float64)

    def d_of(normalized: torch.Tensor) -> float:
        pair = normalized[0, -1].to(torch.float64) @ columns
        return float(pair[0] - pair[1])

    seen: dict[str, torch.Tensor] = {}

    def grab(value: torch.Tensor, hook: Any) -> None:
        seen["out"] = value.detach().clone()

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, -1, head.head] = 0.0
        return z

    def restore(name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def hook_fn(value: torch.Tensor, hook: Any) -> torch.Tensor:
            value = value.clone()
            value[:, -1] = cache[name][:, -1]
            return value
        return hook_fn

    hooks = [(f"blocks.{layer}.attn.hook_z", zero_head)] + [(name, restore(name)) for name in later + frozen]
    hooks.append(("ln_final.hook_out", grab))
    with model.hooks(hooks):
        model.logits(ids)
    return d_of(cache["ln_final.hook_out"]) - d_of(seen["out"])
