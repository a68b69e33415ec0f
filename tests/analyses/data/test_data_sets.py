"""Sanity checks for the project-written data sets (no torch needed)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:  # allow running from any working directory
    sys.path.insert(0, str(_ROOT))

from analyses.data.capitals import CAPITALS, Capital, capital_of  # noqa: E402
from analyses.data.harmless import (  # noqa: E402
    BORDERLINE_HARMLESS_PROMPTS,
    HARMLESS_PROMPTS,
    REFUSAL_PHRASES,
)
from analyses.data.needles import NEEDLES  # noqa: E402


def test_at_least_170_capitals() -> None:
    assert len(CAPITALS) >= 170


def test_countries_unique() -> None:
    countries = [c.country.casefold() for c in CAPITALS]
    assert len(countries) == len(set(countries))


def test_capital_fields_well_formed() -> None:
    for c in CAPITALS:
        assert c.country.strip() == c.country and c.country
        assert c.capital.strip() == c.capital and c.capital
        assert c.capital not in c.variants, c
        assert len(set(c.variants)) == len(c.variants), c


def test_capital_of_lookup() -> None:
    assert capital_of("France") == Capital("France", "Paris")
    assert capital_of("ukraine").capital == "Kyiv"
    assert "Kiev" in capital_of("Ukraine").variants


def test_capital_of_unknown_raises_key_error() -> None:
    with pytest.raises(KeyError, match="Atlantis"):
        capital_of("Atlantis")


def test_needles() -> None:
    assert len(NEEDLES) == 6
    for needle in NEEDLES:
        assert needle.answer in needle.fact, needle
        assert 8 <= len(needle.answer.split()) <= 20, needle
        assert needle.answer not in needle.question, needle
    assert len({n.fact for n in NEEDLES}) == len(NEEDLES)


def test_harmless_prompts_unique_and_enough() -> None:
    assert len(HARMLESS_PROMPTS) >= 180
    assert len(set(HARMLESS_PROMPTS)) == len(HARMLESS_PROMPTS)
    assert all(p.strip() == p and p for p in HARMLESS_PROMPTS)


def test_borderline_subset_of_harmless() -> None:
    assert len(BORDERLINE_HARMLESS_PROMPTS) >= 15
    assert set(BORDERLINE_HARMLESS_PROMPTS) <= set(HARMLESS_PROMPTS)


def test_refusal_phrases_lowercase_and_unique() -> None:
    assert len(REFUSAL_PHRASES) >= 30
    assert all(p == p.lower() and p.strip() == p and p for p in REFUSAL_PHRASES)
    assert len(set(REFUSAL_PHRASES)) == len(REFUSAL_PHRASES)


def test_data_modules_use_only_stdlib_imports() -> None:
    allowed = {"__future__", "dataclasses"}
    for name in ("capitals", "harmless", "needles"):
        tree = ast.parse((_ROOT / "analyses" / "data" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            else:
                continue
            assert mods <= allowed, (name, mods)
