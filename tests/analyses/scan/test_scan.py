"""Batch scans: resumable after an interruption, reports rebuilt identically, schema-valid results."""

from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import plotly.graph_objects as go
import pytest
import torch

from analyses import registry
from analyses.report import build_html, compare_documents, load_document, write_reports
from analyses.scan import ScanSettings, run_scan
from probe.results import HeadScores

SCHEMA = json.loads((Path(__file__).resolve().parents[3] / "docs" / "results.schema.json").read_text())
RUNS: list[str] = []


def _fake_module(name: str, peak: int) -> types.ModuleType:
    """A stand-in analyzer with the real contract, counting its runs."""
    module = types.ModuleType(name)

    @dataclass(frozen=True)
    class FakeConfig:
        size: int = 2
        seed: int = 0

    @dataclass
    class FakeResult:
        scores: HeadScores

        def to_json(self):
            return {"scores": self.scores.to_json()}

        @classmethod
        def from_json(cls, data):
            return cls(HeadScores.from_json(data["scores"]))

    def run(model, config, progress=None):
        RUNS.append(name)
        if progress:
            progress(0.5, "half way")
        values = torch.zeros(model.n_layers, model.n_heads)
        values.view(-1)[peak] = 1.0 + config.size
        return FakeResult(HeadScores(name, "fake units", values))

    def figures(result):
        return {"scores": go.Figure(go.Heatmap(z=result.scores.scores.numpy()))}

    module.FakeConfig, module.FakeResult, module.run, module.figures = FakeConfig, FakeResult, run, figures
    module.summary = lambda result: f"{name} summary"
    module.VERSION = "1"
    return module


@pytest.fixture()
def fakes(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBE_HOME", str(tmp_path / "home"))
    entries = []
    for name, peak in (("fake_a", 1), ("fake_b", 6)):
        monkeypatch.setitem(sys.modules, name, _fake_module(name, peak))
        entry = registry.AnalyzerEntry(name, name, "FakeConfig", "FakeResult", "fake")
        monkeypatch.setitem(registry.ANALYZERS, name, entry)
        entries.append(entry)
    RUNS.clear()
    return entries


def test_interrupted_scan_keeps_finished_work_and_resumes(fakes, tiny_gqa, tmp_path):
    out = tmp_path / "scan"
    settings = ScanSettings(analyses=["fake_a", "fake_b"], command="probe scan ...")

    def interrupt_second(kind, name, payload):
        if kind == "start" and name == "fake_b":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scan(tiny_gqa, fakes, settings, out, interrupt_second)
    assert (out / "results" / "fake_a.json").exists() and not (out / "results" / "fake_b.json").exists()
    assert RUNS == ["fake_a"]

    events = []
    document = run_scan(tiny_gqa, fakes, settings, out, lambda kind, name, payload: events.append((kind, name)))
    assert RUNS == ["fake_a", "fake_b"]  # fake_a was not recomputed
    assert ("skip", "fake_a") in events and ("done", "fake_b") in events
    assert document["analyses"]["fake_b"]["top_heads"][0] == ["L1H2", 3.0]
    jsonschema.validate(document, SCHEMA)

    run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"], force=True), out)
    assert RUNS == ["fake_a", "fake_b", "fake_a", "fake_b"]
    run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a"], overrides={"fake_a": {"size": 5}}), out)
    assert RUNS[-1] == "fake_a"  # a changed setting is a different result


def test_report_rebuilds_identically_from_results_json(fakes, tiny_gqa, tmp_path):
    out = tmp_path / "scan"
    document = run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"], command="probe scan x"), out)
    html_path, md_path = write_reports(out, document)
    first = html_path.read_text()
    assert build_html(load_document(out)) == first
    assert "fake_a summary" in first and "Head atlas" in first and "probe scan x" in first
    assert "<script src=" not in first and "Plotly.newPlot" in first  # plotly.js inline: opens offline
    assert "| fake_b | fake units | L1H2 (3)" in md_path.read_text()


def test_compare_two_scans(fakes, tiny_gqa, tmp_path):
    a = run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a"]), tmp_path / "a")
    b = run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a"], overrides={"fake_a": {"size": 4}}), tmp_path / "b")
    text = compare_documents(a, b)
    assert "== fake_a" in text and "L0H1 +2" in text


def test_bad_scan_requests_are_clear(fakes, tmp_path):
    from probe.errors import ProbeError

    with pytest.raises(ProbeError, match="Unknown analysis"):
        registry.resolve("nonsense")
    with pytest.raises(ProbeError, match="has no setting"):
        registry.make_config(fakes[0], overrides={"nope": 1})
    with pytest.raises(ProbeError, match="does not exist"):
        load_document(tmp_path / "nowhere")


# ---- damaged caches: reported, set aside (bytes kept), recomputed; never fatal ------------------------

def _truncate(path: Path) -> bytes:
    damaged = path.read_bytes()[:100]
    path.write_bytes(damaged)
    return damaged


def _set_aside_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def test_truncated_scan_result_is_set_aside_and_recomputed(fakes, tiny_gqa, tmp_path):
    out = tmp_path / "scan"
    run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"]), out)
    damaged = _truncate(out / "results" / "fake_a.json")

    events = []
    document = run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"]), out,
                        lambda kind, name, payload: events.append((kind, name, payload)))
    corrupt = [payload for kind, name, payload in events if kind == "corrupt"]
    assert [name for kind, name, _ in events if kind == "corrupt"] == ["fake_a"]
    assert "fake_a.json" in corrupt[0]["message"] and "JSONDecodeError" in corrupt[0]["message"]
    [kept] = _set_aside_copies(out / "results" / "fake_a.json")
    assert kept.read_bytes() == damaged and corrupt[0]["moved_to"] == str(kept)
    assert ("skip", "fake_b") in [(kind, name) for kind, name, _ in events]
    assert json.loads((out / "results" / "fake_a.json").read_text())["top_heads"][0] == ["L0H1", 3.0]
    assert set(document["analyses"]) == {"fake_a", "fake_b"} and document["errors"] == {}
    jsonschema.validate(document, SCHEMA)


def test_truncated_run_record_is_set_aside_and_recomputed_once(fakes, tiny_gqa, tmp_path):
    run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), tmp_path / "first")
    [record] = (tmp_path / "home" / "runs" / "fake_a").glob("*.json")
    damaged = _truncate(record)

    events = []
    document = run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), tmp_path / "second",
                        lambda kind, name, payload: events.append((kind, name)))
    assert ("corrupt", "fake_a") in events and ("done", "fake_a") in events
    assert document["errors"] == {} and "fake_a" in document["analyses"]
    assert RUNS == ["fake_a", "fake_a"]  # recomputed, not failed
    assert [p.read_bytes() for p in _set_aside_copies(record)] == [damaged]
    assert json.loads(record.read_text())["name"] == "fake_a"

    events.clear()
    run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), tmp_path / "third",
             lambda kind, name, payload: events.append((kind, name)))
    assert RUNS == ["fake_a", "fake_a"] and ("corrupt", "fake_a") not in events  # fixed for good


def test_unreadable_run_record_is_a_warning_for_the_app(fakes, tiny_gqa, tmp_path):
    from analyses.scan import cached_runs, run_cached
    from probe.files import CorruptFileWarning

    run_cached(tiny_gqa, fakes[0], registry.make_config(fakes[0]), 0)
    [record] = (tmp_path / "home" / "runs" / "fake_a").glob("*.json")
    record.write_text('{"name": "fake_a", "key": ')
    with pytest.warns(CorruptFileWarning, match="fake_a"):
        assert cached_runs(tiny_gqa, fakes[0]) == []
    assert len(_set_aside_copies(record)) == 1
    record.write_text("[1, 2]")  # parses, but is no record
    with pytest.warns(CorruptFileWarning, match="JSON object"):
        _, _, from_cache = run_cached(tiny_gqa, fakes[0], registry.make_config(fakes[0]), 0)
    assert not from_cache and len(_set_aside_copies(record)) == 2


def test_probe_scan_reports_a_corrupt_cache_file_in_one_line(fakes, tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "scan"
    assert main(["scan", "--model", "tiny-gqa", "--device", "cpu", "--threads", "1", "--analyses", "fake_a",
                 "--out", str(out)]) == 0
    _truncate(out / "results" / "fake_a.json")
    capsys.readouterr()
    assert main(["scan", "--model", "tiny-gqa", "--device", "cpu", "--threads", "1", "--analyses", "fake_a",
                 "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "corrupt" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: corrupt cache file ")
    assert str(out / "results" / "fake_a.json") in lines[0] and "recomputing" in lines[0]


def test_corrupt_results_json_is_one_clear_line_and_rebuilt(fakes, tiny_gqa, tmp_path):
    from probe.errors import ProbeError

    out = tmp_path / "scan"
    run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"]), out)
    _truncate(out / "results.json")
    with pytest.raises(ProbeError, match="is corrupt .*rerun `probe scan"):
        load_document(out)
    document = run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)  # rebuilt, nothing rerun
    assert RUNS == ["fake_a", "fake_b"] and set(load_document(out)["analyses"]) == {"fake_a", "fake_b"}
    assert set(document["analyses"]) == {"fake_a", "fake_b"}


# ---- one folder, several scans: results.json and the report keep every analysis ----------------------

def test_scans_of_different_analyses_into_one_folder_add_up(fakes, tiny_gqa, tmp_path):
    out = tmp_path / "scan"
    run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"], command="probe scan --analyses fake_a"), out)
    document = run_scan(tiny_gqa, fakes[1:], ScanSettings(analyses=["fake_b"], command="probe scan --analyses fake_b"),
                        out)
    on_disk = load_document(out)
    assert set(on_disk["analyses"]) == set(document["analyses"]) == {"fake_a", "fake_b"}
    assert on_disk["settings"]["analyses"] == ["fake_a", "fake_b"]
    assert on_disk["command"].splitlines() == ["probe scan --analyses fake_a", "probe scan --analyses fake_b"]
    jsonschema.validate(on_disk, SCHEMA)
    html_path, md_path = write_reports(out)
    assert "fake_a summary" in html_path.read_text() and "fake_b summary" in html_path.read_text()
    assert "| fake_a |" in md_path.read_text() and "| fake_b |" in md_path.read_text()


def test_another_scans_error_survives_and_another_models_records_do_not_join(fakes, tiny_gqa, tiny_llama, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "scan"

    def broken(model, config, progress=None):
        raise RuntimeError("planted failure")

    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["fake_a"], "run", broken)
        first = run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
    assert first["errors"] == {"fake_a": "RuntimeError: planted failure"}
    second = run_scan(tiny_gqa, fakes[1:], ScanSettings(analyses=["fake_b"]), out)
    assert second["errors"] == first["errors"] and set(second["analyses"]) == {"fake_b"}
    third = run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
    assert third["errors"] == {} and set(third["analyses"]) == {"fake_a", "fake_b"}  # fixed by the rerun
    other = run_scan(tiny_llama, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
    assert set(other["analyses"]) == {"fake_a"} and other["model"]["spec"] == "tiny-llama"


def test_results_json_is_written_under_the_folder_lock(fakes, tiny_gqa, tmp_path, monkeypatch):
    from analyses import scan
    from probe.errors import ProbeError

    out = tmp_path / "scan"
    monkeypatch.setattr(scan, "LOCK_TIMEOUT_S", 0.3)
    with scan.scan_lock(out, timeout=1):  # another scan is merging into this folder
        with pytest.raises(ProbeError, match="Another probe scan is still writing into"):
            run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
        assert (out / "results" / "fake_a.json").exists()  # the finished analysis is kept
        assert not (out / "results.json").exists()
    document = run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
    assert RUNS == ["fake_a"] and "fake_a" in document["analyses"]


def test_a_scan_waits_for_the_folder_lock_then_merges(fakes, tiny_gqa, tmp_path):
    import threading

    from analyses import scan

    out = tmp_path / "scan"
    run_scan(tiny_gqa, fakes[:1], ScanSettings(analyses=["fake_a"]), out)
    done = threading.Event()
    outcome: dict = {}

    def second_scan():
        outcome["document"] = run_scan(tiny_gqa, fakes[1:], ScanSettings(analyses=["fake_b"]), out)
        done.set()

    with scan.scan_lock(out, timeout=1):
        worker = threading.Thread(target=second_scan)
        worker.start()
        deadline = time.monotonic() + 60
        while not (out / "results" / "fake_b.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (out / "results" / "fake_b.json").exists()
        assert not done.wait(0.5)  # blocked on the lock, results.json not rewritten yet
        assert set(load_document(out)["analyses"]) == {"fake_a"}
    worker.join(60)
    assert done.is_set() and set(outcome["document"]["analyses"]) == {"fake_a", "fake_b"}
