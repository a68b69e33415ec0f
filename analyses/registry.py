"""The analyzers the faces know, by name: module, config and result classes, presets.

Each entry is imported lazily, so a face that lists analyzers does not pay for torch-heavy imports
of the ones it does not run. A module missing from this checkout is reported, not guessed at.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from probe.errors import ProbeError


@dataclass(frozen=True)
class AnalyzerEntry:
    name: str
    module: str
    config_class: str
    result_class: str
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)

    def result_type(self) -> type:
        return getattr(self.load(), self.result_class)

    def version(self) -> str:
        return str(getattr(self.load(), "VERSION", "0"))


ANALYZERS: dict[str, AnalyzerEntry] = {
    e.name: e
    for e in (
        AnalyzerEntry("retrieval", "analyses.retrieval", "RetrievalConfig", "RetrievalResult",
                      "retrieval heads (Wu et al. 2024): copy-paste score on needle-in-a-haystack"),
        AnalyzerEntry("successor", "analyses.successor", "SuccessorConfig", "SuccessorResult",
                      "successor heads (Gould et al. 2023): effective OV circuit increments"),
        AnalyzerEntry("safety", "analyses.safety", "SafetyConfig", "SafetyResult",
                      "safety heads: Ships score and Sahara group search"),
        AnalyzerEntry("factual", "analyses.factual", "FactualConfig", "FactualResult",
                      "factual-recall heads (Yu et al. 2023): memorised vs in-context answers"),
        AnalyzerEntry("cdt", "analyses.cdt", "CDTConfig", "CDTResult",
                      "CD-T: contextual decomposition circuits"),
        AnalyzerEntry("duo", "analyses.duo", "DuoConfig", "DuoResult",
                      "DuoAttention: learned retrieval/streaming gates"),
    )
}


def available() -> dict[str, AnalyzerEntry]:
    """Entries whose module imports in this checkout (an analyzer still being built is left out)."""
    found = {}
    for name, entry in ANALYZERS.items():
        try:
            module = entry.load()
        except ImportError:
            continue
        if hasattr(module, entry.config_class) and hasattr(module, "run"):
            found[name] = entry
    return found


def resolve(names: str) -> list[AnalyzerEntry]:
    """`all` or a comma-separated list → entries; unknown or unavailable names are a clear error."""
    present = available()
    if names.strip() == "all":
        return list(present.values())
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in ANALYZERS:
            raise ProbeError(f"Unknown analysis {name!r}; choose from {', '.join(ANALYZERS)} or all.")
        if name not in present:
            raise ProbeError(f"The {name} analysis is not available in this version of probe.")
        chosen.append(present[name])
    return chosen


def make_config(entry: AnalyzerEntry, preset: str = "default", overrides: dict[str, Any] | None = None,
                seed: int | None = None) -> Any:
    """The analyzer's config: a module-level preset (e.g. `QUICK`) if it has one, then overrides.

    Lists from YAML become tuples (configs are frozen dataclasses); unknown keys are an error.
    """
    module = entry.load()
    config_type = entry.config_type()
    config = getattr(module, preset.upper(), None)
    if not isinstance(config, config_type):
        config = config_type()
    changes = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(config_type)}
    if seed is not None and "seed" in fields:
        changes["seed"] = seed
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ProbeError(f"{entry.name} has no setting(s) {', '.join(unknown)}; it has: {', '.join(sorted(fields))}.")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    return dataclasses.replace(config, **changes)
