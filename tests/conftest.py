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


def _family_names() -> list[str]:
    from families import FAMILIES

    return list(FAMILIES)


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


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    """A folder for the tiny family models of tests/families.py that a module builds."""
    return tmp_path_factory.mktemp("families")


@pytest.fixture(params=_family_names())
def family(request: pytest.FixtureRequest, root):
    """(name, model loaded as `hf:<folder>`) for every family of tests/families.py, built once per process
    (tests/matrix.py); modules that need the independent copy too define their own `family`."""
    from matrix import loaded_family

    model, _, _ = loaded_family(request.param, root)
    return request.param, model
