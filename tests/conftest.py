"""Shared fixtures: tiny models (milliseconds) and the embedded models (loaded once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# One thread: on the 2-core machines, two torch threads competing with any other process (a
# notebook kernel, the app server of the browser test) were seen to run 10x slower (the small
# CD-T passes 10-40x: planted test 15.8 s vs 0.15 s).
TEST_THREADS = int(os.environ.get("PROBE_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

from probe import assets  # noqa: E402
from probe.models import LoadedModel, load_model  # noqa: E402


def _embedded(spec: str, asset: str) -> LoadedModel:
    if not assets.is_available(asset):
        pytest.fail(f"asset {asset} missing: run `make fetch` (or `probe fetch {asset}`) before the tests")
    return load_model(spec, device="cpu")


@pytest.fixture(autouse=True)
def fixed_torch_threads():
    """Every test starts and ends at the session's thread count: a CLI test that switched on the
    automatic policy (probe.runtime) must not leave it re-deciding threads for the tests after it."""
    from probe.runtime import set_threads

    set_threads(TEST_THREADS)
    yield
    set_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return _embedded("smollm2-135m", "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    return _embedded("gemma3-270m", "gemma3-270m")


@pytest.fixture()
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama", device="cpu")


@pytest.fixture()
def tiny_gqa() -> LoadedModel:
    return load_model("tiny-gqa", device="cpu")


@pytest.fixture()
def tiny_gpt2() -> LoadedModel:
    return load_model("tiny-gpt2", device="cpu")
