"""`probe doctor MODEL` on tiny families (tests/support/families.py, loaded as `hf:<folder>`) and tiny specs:
every check passes on covered families, a deliberately broken intervention makes it fail (exit 1), an
uncovered family names its missing component (exit 1), bad input is one line (exit 2), and the app's
Model page runs it on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analyses import doctor as doctor_module
from analyses.doctor import CHECKS, DoctorError, doctor, table_rows
from analyses.doctor import checks as doctor_checks
from analyses.doctor import run as doctor_run
from app import cli
from families import build_folder
from probe import interventions
from probe.architecture import architecture
from probe.models import load_model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("doctor")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_doctor_json_passes_every_check_on_a_gqa_llama_folder(root, capsys):
    code, out, err = run_cli(capsys, "doctor", f"hf:{build_folder('llama', root)}", "--json", "--threads", "1")
    result = json.loads(out)
    assert code == 0, result
    assert result["ok"] and result["supported"] and result["adapter"] == "LlamaArchitectureAdapter"
    assert [c["name"] for c in result["checks"]] == [name for name, _ in CHECKS]
    assert [c["number"] for c in result["checks"]] == list(range(1, len(CHECKS) + 1))
    # Ships on tiny random weights: the output ignores the attention patterns (KL ~1e-7 nats): skipped, said why
    assert all(c["passed"] and c["value"] <= c["tolerance"] for c in result["checks"] if c["name"] != "Ships")
    ships = result["checks"][7]
    assert ships["passed"] or (ships["passed"] is None and "float32 noise" in ships["detail"])
    assert result["facts"]["n_kv_heads"] == 2 and result["copy"].startswith("reloaded from")
    assert "check 4/9: zero-head" in err  # progress on stderr, the JSON alone on stdout


def test_doctor_passes_on_a_parallel_packed_qkv_layernorm_family(root):
    result = doctor(f"hf:{build_folder('gpt_neox', root)}")
    assert result.ok, [(c.name, c.value, c.detail) for c in result.checks if not c.passed]
    assert result.facts["block"] == "parallel" and result.facts["qkv_fused"]


def test_a_broken_intervention_makes_doctor_fail_with_exit_1(monkeypatch, capsys):
    """Interventions that attach no hook (an ablation that does nothing): the zero-head check sees the
    bridge's logits stay clean while the copy's move, and says FAIL; the other checks still run."""
    monkeypatch.setattr(interventions, "build_hooks", lambda model, chosen: [])
    code, out, _ = run_cli(capsys, "doctor", "tiny-gqa", "--threads", "1")
    assert code == 1
    assert "FAIL" in out and "FAILED: zero-head" in out
    row = next(line for line in out.splitlines() if "zero-head" in line and "│" in line)
    assert "FAIL" in row


def test_a_copy_whose_weights_differ_fails_the_logits_check(monkeypatch):
    """The logits check compares against the copy, not the bridged model itself: one final-norm weight
    of the copy nudged by 0.05 shows."""
    real = doctor_run.independent_copy

    def nudged(model):
        copy, how = real(model)
        final = copy.get_submodule(architecture(model).path("ln_final"))
        with torch.no_grad():
            final.weight[0] += 0.05
        return copy, how

    monkeypatch.setattr(doctor_run, "independent_copy", nudged)
    result = doctor("tiny-llama", only=["logits"])
    assert [c.name for c in result.checks] == ["logits"]
    assert result.checks[0].passed is False and result.checks[0].value > 1e-3 and result.exit_code == 1


def test_an_ablation_that_moves_nothing_is_a_failure_not_a_pass(monkeypatch):
    """A check whose two sides both stay clean compares nothing: reported as failed, with the reason."""
    monkeypatch.setattr(doctor_checks, "MOVED", float("inf"))
    result = doctor("tiny-llama", only=["zero-head"])
    zero = next(c for c in result.checks if c.name == "zero-head")
    assert zero.passed is False and "nothing to compare" in zero.detail and not result.ok


def test_a_check_that_raises_is_a_failed_row_and_the_others_still_run(monkeypatch):
    def boom(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(doctor_checks.RUNNERS, "Ships", boom)
    result = doctor("tiny-llama", only=["Ships", "retrieval"])
    rows = {c.name: c for c in result.checks}
    assert rows["Ships"].passed is False and rows["Ships"].detail == "RuntimeError: boom"
    assert rows["retrieval"].passed and rows["logits"].passed and result.exit_code == 1


def test_a_check_with_nothing_to_compare_is_skipped_not_passed(monkeypatch):
    """An output that ignores the heads (both Ships paths all 0) cannot show a disagreement: `skip`."""
    from analyses import safety

    zeros = lambda model, ids, **kw: torch.zeros(model.n_layers, model.n_heads)  # noqa: E731
    monkeypatch.setattr(safety, "ships_query", zeros)
    monkeypatch.setattr(safety, "ships_query_reference", zeros)
    result = doctor("tiny-llama", only=["Ships"])
    ships = next(c for c in result.checks if c.name == "Ships")
    assert ships.passed is None and "float32 noise" in ships.detail
    assert ("8", "Ships", "0", "1.00e-04", "skip") == table_rows(result)[-1][:5]


def test_progress_is_the_analyzers_protocol_fraction_then_message():
    """`progress(fraction, message)` as every analyzer reports it: fractions from 0 to 1, never falling,
    one message as each check starts and one as it ends."""
    heard: list[tuple[float, str]] = []
    result = doctor("tiny-llama", only=["logits"], progress=lambda fraction, message: heard.append((fraction, message)))
    assert result.ok
    fractions = [fraction for fraction, _ in heard]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    assert heard[0] == (0.0, "loading tiny-llama")
    assert (0.0, "check 1/9: logits") in heard and heard[-1][1].startswith("check 1/9: logits: pass")
    assert heard[-1][0] == pytest.approx(1 / len(CHECKS))


def test_an_uncovered_family_names_the_missing_component(root, capsys):
    code, out, _ = run_cli(capsys, "doctor", f"hf:{build_folder('mamba', root)}", "--threads", "1")
    assert code == 1
    assert "MambaArchitectureAdapter" in out and "blocks.0.attn" in out
    code, out, _ = run_cli(capsys, "doctor", f"hf:{build_folder('mamba', root)}", "--json", "--threads", "1")
    result = json.loads(out)
    assert code == 1 and not result["supported"] and result["missing_component"] == "blocks.0.attn"


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for spec in ("no-such-model", f"hf:{tmp_path / 'nowhere'}"):
        code, _, err = run_cli(capsys, "doctor", spec, "--threads", "1")
        assert code == 2 and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    with pytest.raises(DoctorError, match="float32"):
        doctor(load_model("tiny-llama", device="cpu", dtype="bfloat16"))
    with pytest.raises(DoctorError, match="Unknown doctor check"):
        doctor("tiny-llama", only=["nonsense"])


def test_the_model_page_runs_the_doctor_and_caches_it(monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    pages = Path(__file__).resolve().parents[3] / "app" / "views"
    monkeypatch.setenv("PROBE_APP_MODEL", "tiny-gqa")
    app = AppTest.from_file(str(pages / "model.py"), default_timeout=120)
    app.session_state["model_spec"] = "tiny-gqa"
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return doctor(*args, **kwargs)

    monkeypatch.setattr(doctor_module, "doctor", counted)  # the page imports it from the package when it runs
    app.run()
    assert not app.exception and not calls  # only on request
    next(b for b in app.button if b.label == "Run doctor").click().run()
    assert not app.exception
    assert any("all checks pass" in s.value for s in app.success)
    table = app.table[-1].value
    assert list(table["result"]) == ["pass"] * 7 + ["skip", "pass"]  # Ships: tiny weights, KL ~1e-7 (noise)
    next(b for b in app.button if b.label == "Run doctor").click().run()
    assert not app.exception and len(calls) == 1  # the second click reads the cache (per fingerprint)
