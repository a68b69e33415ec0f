"""Shared pieces of the fused-path tests (tests/families/test_fused_families.py, test_fused_routing.py,
test_fused_analyzers.py): the prompts, the bounds, the folder the family models are built in, and a
block that keeps `model.logits` / `generate` on the bridge, the reference every comparison reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12")
ATOL, RTOL = 1e-4, 1e-4
FLOOR = 1e-2  # relative deviations are taken against max(effect, FLOOR)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the family models are saved in (tests/support/matrix.py builds each once per process)."""
    return tmp_path_factory.mktemp("fused_families")


@contextlib.contextmanager
def _bridge_only(model: Any) -> Iterator[None]:
    """`model.logits` / `generate` on the bridge (they route to the fused path where it is exact)."""
    before, model.fused_routing = model.fused_routing, False
    try:
        yield
    finally:
        model.fused_routing = before
