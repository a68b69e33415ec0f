"""The `probe` command end to end: listing, running with interventions, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=ENV)


def test_models_lists_every_spec():
    result = probe("models")
    assert result.returncode == 0
    for name in ("smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-gqa", "smollm2-135m-refusal", "hf:", "gguf:"):
        assert name in result.stdout


def test_the_cli_registers_the_organism_spec_without_importing_the_organism():
    """`probe models` lists the refusal organism through `analyses.specs`; the organism's package (its
    training code) is imported only when the organism is loaded or asked whether it is built."""
    code = ("import sys; from app import cli; from analyses.specs import register_analysis_specs; "
            "assert 'analyses.organism' not in sys.modules; register_analysis_specs(); "
            "assert 'analyses.organism' not in sys.modules; print('registered'); sys.exit(cli.main(['models']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("registered\n") and "smollm2-135m-refusal" in result.stdout


def test_run_json_shows_both_sides_and_the_interventions():
    result = probe("run", "--model", "tiny-gqa", "--prompt", "the capital of mary is",
                   "--ablate", "L0H*", "--scale", "L1H2:v=-1", "--generate", "3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["interventions"] == ["zero-ablate L0H0, L0H1, L0H2, L0H3", "scale value x-1 L1H2"]
    assert len(data["original"]["top"]) == 10
    assert data["total_variation"] > 0
    assert data["original"]["generation"] is not None


@pytest.mark.parametrize("args,message", [
    (["run", "--model", "nope", "--prompt", "x"], "Valid specs"),
    (["run", "--model", "tiny-llama", "--prompt", "x", "--ablate", "L40H2"], "2 layers"),
    (["run", "--model", "tiny-llama", "--prompt", "x", "--scale", "L0H0:k=2"], "Cannot read --scale"),
    (["run", "--model", "tiny-llama", "--prompt", "one " * 300], "context of 256"),
    (["fetch", "no-such-asset"], "Unknown asset"),
])
def test_user_mistakes_are_one_clear_message(args, message):
    result = probe(*args)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


@pytest.mark.embedded
def test_smollm2_paris_and_early_layer_ablation(smollm2):
    result = probe("run", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                   "--ablate", "L0H*,L1H*,L2H*", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["original"]["top"][0]["token"] == " Paris"
    assert data["intervened"]["top"][0]["token"] != " Paris"
    assert data["total_variation"] > 0.5
    assert len(data["interventions"]) == 1 and "L2H8" in data["interventions"][0]
