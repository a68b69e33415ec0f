"""Batch scans: resumable after an interruption, reports rebuilt identically, schema-valid results."""

from __future__ import annotations

import json
import sys
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

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "results.schema.json").read_text())
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
