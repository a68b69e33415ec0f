"""What every check works on: the model, an independent Hugging Face copy of its weights that the bridge
never touched, the check sizes, and the helpers several checks share (left padding, one-token runs)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probe import assets
from probe.architecture import architecture
from probe.errors import ProbeError
from probe.models import SPECS, LoadedModel


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
