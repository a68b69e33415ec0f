"""User input the CLI checks before the model loads (argv text, `--scale`, `--ablate`, `--out`), and the
interventions built from `--ablate` / `--scale` once it has."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from probe.errors import InterventionError, ProbeError
from probe.heads import parse_heads
from probe.interventions import Intervention, ablation, head_means, mean_source_prompts, scale
from probe.models import LoadedModel


_SCALE = re.compile(r"^(?P<heads>[^:]+):(?P<what>q|query|v|value|o|output)=(?P<factor>-?[0-9.eE+-]+)$")
_COMPONENT = {"q": "query", "v": "value", "o": "output"}


def read_scale(text: str) -> tuple[str, str, float]:
    """`L10H2:v=2` → (`L10H2`, `value`, 2.0), checked without a model: a finite factor, a known component."""
    match = _SCALE.match(text.strip())
    if not match:
        raise InterventionError(f"Cannot read --scale {text!r}: write HEADS:q|v|o=FACTOR, e.g. L10H2:v=2.")
    try:
        factor = float(match["factor"])
    except ValueError:
        raise InterventionError(f"Cannot read --scale {text!r}: {match['factor']!r} is not a number "
                                "(write HEADS:q|v|o=FACTOR, e.g. L10H2:v=2).") from None
    if not math.isfinite(factor):
        raise InterventionError(f"--scale {text!r}: the factor {match['factor']} is not a finite number "
                                "(it overflows to infinity); use a finite factor, e.g. L10H2:v=100.")
    return match["heads"].replace("+", ","), _COMPONENT.get(match["what"], match["what"]), factor


def parse_scale(text: str, model: LoadedModel) -> Intervention:
    """`L10H2:v=2`, `5.3:q=0.5`, `L3H*:output=-1` → a scaling intervention."""
    heads, component, factor = read_scale(text)
    return scale(parse_heads(heads, model), component, factor)


def check_ablate(ablate: Sequence[str]) -> None:
    """Each `--ablate` names at least one head (`--ablate ""` would silently ablate nothing)."""
    for text in ablate:
        if not text.replace(",", "").replace("+", "").strip():
            raise InterventionError(f"--ablate {text!r} names no head; give heads such as L5H3 or 'L0H*,L1H2'.")


def build_interventions(model: LoadedModel, ablate: Sequence[str], method: str,
                        scales: Sequence[str]) -> list[Intervention]:
    check_ablate(ablate)
    interventions: list[Intervention] = []
    if ablate:
        heads = parse_heads(",".join(ablate), model)
        if not heads:
            raise InterventionError(f"--ablate {', '.join(map(repr, ablate))} names no head; give heads such as L5H3.")
        means = head_means(model, mean_source_prompts(model), heads) if method == "mean" else None
        interventions.append(ablation(heads, method, means))
    interventions.extend(parse_scale(text, model) for text in scales)
    return interventions


def check_text(option: str, text: str) -> None:
    """Text from argv is decoded with surrogateescape: bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {ascii(bad)}"
        raise ProbeError(f"{option} is not valid UTF-8 text ({byte} at character {error.start}); "
                         "pass UTF-8 text.") from None


def check_out_folder(out: Path) -> None:
    """`--out` is (or can be made) a folder we can write in: checked before the model loads."""
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out {out} is a file, not a folder; give a folder for report.html and results.json.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProbeError(f"Cannot create the --out folder {out}: {error.strerror or error}.") from None
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=out, prefix=".probe-write-check-"):
            pass
    except OSError as error:
        raise ProbeError(f"Cannot write in the --out folder {out}: {error.strerror or error}.") from None


def _command_line() -> str:
    import shlex

    return "probe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
