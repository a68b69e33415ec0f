"""What the CLI writes: the stderr console for messages and progress, one-line texts, strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console


console = Console(stderr=True)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite_json(value: Any) -> tuple[Any, list[str]]:
    """`value` with every NaN/infinite float replaced by None, and the paths replaced (JSON has no NaN)."""
    replaced: list[str] = []

    def walk(item: Any, where: str) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            replaced.append(f"{where or '.'} ({item})")
            return None
        if isinstance(item, dict):
            return {k: walk(v, f"{where}.{k}") for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(item)]
        return item

    return walk(value, ""), replaced


def dumps_json(value: dict[str, Any]) -> str:
    """Strict JSON (never a bare NaN/Infinity): non-finite numbers become null, listed under `non_finite`."""
    clean, replaced = finite_json(value)
    if replaced:
        clean["non_finite"] = {"reason": "these values were NaN or infinite (e.g. an intervention overflowed the "
                                         "model's number type); JSON has no NaN, so they are written as null", "fields": replaced}
    return json.dumps(clean, indent=2, allow_nan=False)
