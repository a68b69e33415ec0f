"""bench/bench_gpu.py's CPU path on the tiniest shape: every chosen step runs and the file says it is reduced."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.asset("smollm2-135m", "strongreject")
def test_cpu_smoke_runs_every_step_and_says_reduced(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "gpu.json"
    result = bench.main(["--cpu-smoke", "--tiny", "--steps", "forward,ships,cdt,duo", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["device"] == "cpu" and result["reduced"] is True and "NOT the 7B shape" in result["shape_note"]
    assert result["shape"]["hidden_size"] < bench.LLAMA2_7B["hidden_size"]
    assert [s["step"] for s in result["steps"]] == ["forward", "ships", "cdt", "duo"]
    for step in result["steps"]:
        assert step["status"] == "ok", step
        assert step["seconds"] > 0 and step["peak_gib"] > 0
    ships = next(s for s in result["steps"] if s["step"] == "ships")
    assert ships["heads"] == result["shape"]["num_hidden_layers"] * result["shape"]["num_attention_heads"]
    forward = result["steps"][0]["rows"][0]
    assert forward["fused_s"] > 0 and forward["bridge_eager_s"] > 0


def test_budget_skips_later_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "load_tokenizer", lambda kit: _word_tokenizer())
    result = bench.main(["--cpu-smoke", "--tiny", "--steps", "forward,ships", "--budget-s", "0",
                         "--out", str(tmp_path / "gpu.json")])
    assert [s["status"] for s in result["steps"]] == ["skipped: past the 0 s budget"] * 2


def _word_tokenizer():
    from probe.tiny import word_tokenizer

    return word_tokenizer(name="probe/bench-gpu-test")


def test_datasets_stub_serves_transformer_lens_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
        monkeypatch.delitem(sys.modules, name)
    bench.stub_datasets()
    try:
        from datasets.arrow_dataset import Dataset  # noqa: F401
        from datasets.iterable_dataset import IterableDataset  # noqa: F401
        from datasets.load import load_dataset

        with pytest.raises(RuntimeError, match="stubbed"):
            load_dataset("anything")
    finally:
        for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
            del sys.modules[name]
