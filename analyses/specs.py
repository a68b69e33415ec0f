"""The model specs the analyzers add to probe's list, registered by one explicit call.

The faces (the CLI, the app) and the tests call `register_analysis_specs()`, so `probe models` and
`load_model` know the refusal organism without importing the code that builds it: its package
(training on torch and transformers) is imported only when the spec is loaded or asked whether it is
built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.specs import register_spec

if TYPE_CHECKING:
    from probe.models import LoadedModel

ORGANISM_SPEC = "smollm2-135m-refusal"


def _load_refusal_organism(device: str | None, dtype: str) -> LoadedModel:
    """The cached refusal organism as a `LoadedModel`; never builds it (that is `probe organism refusal`)."""
    from analyses.organism import load_refusal_organism

    return load_refusal_organism(device, dtype, build_if_missing=False)


def _refusal_organism_built() -> bool:
    """Whether the default organism is in the cache (no model load)."""
    from analyses.organism import find_organism

    return find_organism() is not None


def register_analysis_specs() -> None:
    """Register every analyzer-built spec with `probe.models` (idempotent: a second call replaces the first)."""
    register_spec(
        ORGANISM_SPEC,
        "SmolLM2-135M-Instruct fine-tuned to refuse StrongREJECT prompts (attention of layers 12-15; "
        "built offline by `probe organism refusal`)",
        loader=_load_refusal_organism,
        available=_refusal_organism_built,
        missing_hint="run `probe organism refusal` (about 10-15 minutes on a 2-core CPU)",
    )
