"""The doctor's result: one row per check, the whole run's facts and timings, and their text for the
CLI's table and the app's Model page."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    """One row of the table: `value` the worst deviation (or a count), `passed` None when skipped."""

    number: int
    name: str
    what: str
    value: float | None = None
    tolerance: float | None = None
    passed: bool | None = None
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DoctorResult:
    spec: str
    fingerprint: str
    architecture: str
    adapter: str
    copy: str
    supported: bool
    missing_component: str | None
    facts: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (on a busy machine, wall time says little)
    threads: int = 0
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # load / copy / checks: wall and CPU

    @property
    def ok(self) -> bool:
        return self.supported and all(c.passed is not False for c in self.checks) and \
            any(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "fingerprint": self.fingerprint, "architecture": self.architecture,
                "adapter": self.adapter, "copy": self.copy, "supported": self.supported,
                "missing_component": self.missing_component, "facts": self.facts, "ok": self.ok,
                "checks": [c.to_dict() for c in self.checks], "seconds": round(self.seconds, 2),
                "cpu_seconds": round(self.cpu_seconds, 2), "phases": self.phases,
                "threads": self.threads}


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:.0f}" if float(value).is_integer() and value < 1e6 else f"{value:.2e}"


def table_rows(result: DoctorResult) -> list[tuple[str, str, str, str, str, str]]:
    """(#, check, value, tolerance, pass/fail, detail) per check, for the CLI and the app."""
    rows = []
    for c in result.checks:
        state = "skip" if c.passed is None else ("pass" if c.passed else "FAIL")
        rows.append((str(c.number), c.name, format_value(c.value), format_value(c.tolerance), state, c.detail))
    return rows


def header_lines(result: DoctorResult) -> list[str]:
    lines = [f"{result.spec}: {result.architecture} through TransformerLens's {result.adapter}"]
    if result.supported:
        facts = result.facts
        lines.append("architecture layer: " + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "windows")
                     + (f", windows {sorted(set(map(str, facts['windows'])))}" if "windows" in facts else ""))
        lines.append(f"independent copy: {result.copy}")
    else:
        lines.append(f"unsupported: the architecture layer has no {result.missing_component}")
    return lines


DOCTOR_COLUMNS = ("#", "check", "value", "tolerance", "result", "detail")


def timing_line(result: DoctorResult) -> str:
    """Wall and CPU seconds per phase (load, independent copy, checks) and the threads used."""
    parts = [f"{name} {p['seconds']:.0f} s ({p['cpu_seconds']:.0f} s CPU)" for name, p in result.phases.items()]
    return (f"time: {result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU, {result.threads} thread"
            f"{'s' if result.threads > 1 else ''}" + (f"; {', '.join(parts)}" if parts else ""))
