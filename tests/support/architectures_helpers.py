"""Shared pieces of the architecture proof matrix's test files (tests/families/test_architectures_*.py).

The families, the prompt, the logits tolerance, the per-family fixture (the model loaded the user's way,
`hf:<folder>`, and an independent Hugging Face copy, once per process through tests/support/matrix.py), the
matrix printout at the end of each module (`-s`), the intervention checks every family records, and
`_patched` (attributes of the HF copy set for a block and always restored).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from families import FAMILIES
from matrix import format_cells, loaded_family
from probe.models import LoadedModel

ALL = list(FAMILIES)
TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ATOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    print("\nlargest deviation (smallest effect) per family x check\n" + format_cells(ALL))


@pytest.fixture(params=ALL)
def family(request: pytest.FixtureRequest, root: Path) -> tuple[str, LoadedModel, torch.nn.Module]:
    """(name, model loaded with `load_model("hf:<folder>")`, independent HF copy), once per process
    (tests/support/matrix.py)."""
    model, copy, _ = loaded_family(request.param, root)
    return request.param, model, copy


INTERVENTION_CHECKS = ("zero", "mean", "resample", "uniform", "scale query", "scale value", "scale output")


@contextlib.contextmanager
def _patched(changes: list[tuple[Any, str, Any]]) -> Any:
    """Set attributes (module attributes, submodules, a parameter's `.data`) for the block; restore always."""
    old = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in changes]
    try:
        for owner, attr, value in changes:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(old):
            setattr(owner, attr, value)
