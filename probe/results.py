"""Result types with provenance, their JSON round-trip, and an on-disk cache keyed by provenance.

`HeadScores` is the common currency: a `[n_layers, n_heads]` tensor with a name, units and the
provenance that says exactly how it was computed. Analyzer results are dataclasses that hold
`HeadScores` plus their own evidence; they serialise to plain JSON dicts (`to_json`/`from_json`)
so the app, the notebooks and the CLI read the same cached object.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from probe import __version__
from probe.assets import probe_home
from probe.files import CorruptHandler, atomic_writer, read_json_or_set_aside
from probe.heads import Head


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of a JSON-able object with sorted keys (dataclasses and enums allowed)."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:length]


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums, tensors, paths and heads into plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Head):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


@dataclass(frozen=True)
class Provenance:
    """Everything that determines a result; `key` hashes all of it except the creation time."""

    model_spec: str
    model_fingerprint: str
    analyzer: str
    analyzer_version: str
    config: dict[str, Any]
    data_hash: str
    seed: int
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    probe_version: str = __version__

    @property
    def key(self) -> str:
        fields = to_jsonable(self)
        fields.pop("created")
        return stable_hash(fields)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Provenance:
        return cls(**data)


@dataclass
class HeadScores:
    """A score per query head: `scores[layer, head]`."""

    name: str
    units: str
    scores: torch.Tensor
    provenance: Provenance | None = None
    description: str = ""

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    def __getitem__(self, head: Head) -> float:
        return float(self.scores[head.layer, head.head])

    def top(self, k: int = 10, largest: bool = True) -> list[tuple[Head, float]]:
        """The k best heads (NaN scores last), best first."""
        flat = self.scores.flatten().to(torch.float64)
        filled = torch.nan_to_num(flat, nan=float("-inf") if largest else float("inf"))
        order = torch.argsort(filled, descending=largest)[: min(k, flat.numel())]
        return [(Head(int(i) // self.n_heads, int(i) % self.n_heads), float(flat[i])) for i in order]

    def above(self, threshold: float) -> list[tuple[Head, float]]:
        return [(h, s) for h, s in self.top(self.scores.numel()) if s > threshold]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "units": self.units, "description": self.description,
            "shape": list(self.scores.shape), "scores": to_jsonable(self.scores.to(torch.float64)),
            "provenance": to_jsonable(self.provenance) if self.provenance else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadScores:
        scores = torch.tensor([[float("nan") if v is None else v for v in row] for row in data["scores"]],
                              dtype=torch.float64)
        provenance = Provenance.from_json(data["provenance"]) if data.get("provenance") else None
        return cls(data["name"], data["units"], scores, provenance, data.get("description", ""))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file (temp file + rename; no temp file is left behind)."""
    with atomic_writer(path) as out:
        json.dump(to_jsonable(data), out, indent=1)


def _check_cache_entry(data: Any) -> None:
    """What `ResultCache` readers need of a file: a provenance (with model and time) and a result."""
    if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict) or "result" not in data:
        raise ValueError("not a cache entry (provenance and result expected)")
    for name in ("model_fingerprint", "created"):
        if name not in data["provenance"]:
            raise KeyError(f"provenance lacks {name!r}")


class ResultCache:
    """Results on disk under `<root>/<analyzer>/<provenance key>.json`, written atomically.

    An unreadable entry is a miss, not an error: it is set aside (`.corrupt-<time>`, bytes kept) and
    reported to `on_corrupt` (default: a `CorruptFileWarning`), so the result is simply computed again.
    """

    def __init__(self, root: Path | None = None, on_corrupt: CorruptHandler | None = None) -> None:
        self.root = Path(root) if root else probe_home() / "results"
        self.on_corrupt = on_corrupt

    def path(self, provenance: Provenance) -> Path:
        return self.root / provenance.analyzer / f"{provenance.key}.json"

    def get(self, provenance: Provenance) -> dict[str, Any] | None:
        return read_json_or_set_aside(self.path(provenance), self.on_corrupt, _check_cache_entry)

    def put(self, provenance: Provenance, result: dict[str, Any]) -> Path:
        path = self.path(provenance)
        write_json_atomic(path, {"provenance": to_jsonable(provenance), "result": result})
        return path

    def entries(self, model_fingerprint: str | None = None) -> Iterable[dict[str, Any]]:
        """Every cached result (optionally of one model), newest first."""
        found = []
        for path in self.root.glob("*/*.json"):
            data = read_json_or_set_aside(path, self.on_corrupt, _check_cache_entry)
            if data is None:
                continue
            if model_fingerprint is None or data["provenance"]["model_fingerprint"] == model_fingerprint:
                found.append(data)
        return sorted(found, key=lambda d: d["provenance"]["created"], reverse=True)
