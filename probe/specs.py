"""The model specs: the names `load_model` accepts, what each is, and whether it loads offline now.

- `smollm2-135m` (default) and `gemma3-270m`: embedded, from the pinned GGUF assets (`probe fetch`);
- `tiny-llama`, `tiny-gqa`, `tiny-gpt2`: seeded random weights from a local config, in-process tokenizer;
- `hf:<local dir or hub id>` and `gguf:<path to .gguf>`: any model a user has;
- specs registered from outside the core (`register_spec`: the refusal organism), so the core loads
  them without importing the code that builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from probe import assets
from probe.loaded import LoadedModel

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """A named way to obtain a model; `asset` names the offline asset it needs, if any."""

    name: str
    description: str
    asset: str | None = None
    gguf_file: str | None = None
    hub_name: str = ""  # the upstream name, given to the bridge for its architecture table
    embedded: bool = False


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct (Llama arch, 30L x 9H, 3 KV heads), 4-bit GGUF",
                  asset="smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  hub_name="HuggingFaceTB/SmolLM2-135M-Instruct", embedded=True),
        ModelSpec("gemma3-270m", "Gemma-3-270m base (18L x 4H, 1 KV head), Q4_K_M GGUF",
                  asset="gemma3-270m", gguf_file="gemma-3-270m-q4_k_m.gguf",
                  hub_name="google/gemma-3-270m", embedded=True),
        ModelSpec("tiny-llama", "random Llama, 2L x 4H (MHA), d_model 64, word tokenizer; for tests",
                  hub_name="probe/tiny-llama"),
        ModelSpec("tiny-gqa", "random Llama, 2L x 4H with 2 KV heads (GQA), d_model 64; for tests",
                  hub_name="probe/tiny-gqa"),
        ModelSpec("tiny-gpt2", "random GPT-2 shape, 2L x 4H, LayerNorm/GELU/learned positions; for tests",
                  hub_name="probe/tiny-gpt2"),
    )
}
PATH_PREFIXES = ("hf:", "gguf:")


@dataclass(frozen=True)
class RegisteredSpec:
    """A spec registered from outside the core (e.g. a model organism built by an analyzer module),
    so the core can load it without importing the code that builds it."""

    name: str
    description: str
    loader: Callable[[str | None, str], LoadedModel]
    available: Callable[[], bool]
    missing_hint: str = ""


REGISTERED_SPECS: dict[str, RegisteredSpec] = {}


def register_spec(name: str, description: str, loader: Callable[[str | None, str], LoadedModel],
                  available: Callable[[], bool], missing_hint: str = "") -> None:
    """Make `load_model(name)` call `loader(device, dtype)`; `available()` says whether it loads offline now."""
    REGISTERED_SPECS[name] = RegisteredSpec(name, description, loader, available, missing_hint)


def list_specs() -> list[tuple[ModelSpec, bool]]:
    """Every named spec and whether it can be loaded offline right now."""
    return [(spec, spec.asset is None or assets.is_available(spec.asset)) for spec in SPECS.values()]


def _asset_state_text(asset: str | None) -> str:
    """"ready", or what is wrong with the spec's asset and the command that fixes it."""
    state = "ready" if asset is None else assets.asset_state(asset)
    return {"ready": "ready", "missing": f"missing: run `probe fetch {asset}`",
            "corrupt": f"corrupt: run `probe fetch --force {asset}`"}[state]


def spec_summary() -> str:
    """Text for `probe models`: each spec, what it is, and whether it is available offline now."""
    rows = [(spec.name, _asset_state_text(spec.asset), spec.description) for spec in SPECS.values()]
    rows += [(registered.name, "ready" if registered.available() else f"missing: {registered.missing_hint}",
              registered.description) for registered in REGISTERED_SPECS.values()]
    rows += [("hf:<dir|id>", "", "any Hugging Face causal LM (local folder, or hub id with network)"),
             ("gguf:<path>", "", "any GGUF file transformers can read")]
    name_width = max(len(name) for name, _, _ in rows)  # columns fit the longest name (e.g. an organism's)
    state_width = max(len(state) for _, state, _ in rows)
    return "\n".join(f"{name:{name_width}s}  {state:{state_width}s}  {text}".rstrip() for name, state, text in rows)
