"""Bad input to the `probe` command: one clear line, exit code 2, never a traceback, and no silent
wrong answers (an empty head list, NaN in JSON, scans of different models compared head by head).

Most cases run `app.cli.main` in-process on the random tiny models (milliseconds each); the one
case where argv bytes matter (a prompt that is not UTF-8) runs the real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analyses import registry
from app import cli
from app.cli_output import dumps_json
from probe.errors import ProbeError

TINY = ["--model", "tiny-llama", "--threads", "1"]


def strict_json(text: str):
    """json.loads that refuses the NaN/Infinity extensions Python's json accepts."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c} in JSON")))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, word: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert word in lines[0], lines[0]


# ---- files the cases need ----------------------------------------------------------------------

BOMB = "\n".join(["bomb:", '  a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
                 + [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]) + "\n"


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "typo.yaml").write_text("retreival:\n  lengths: [64]\n")
    (tmp_path / "lots.yaml").write_text('successor:\n  number_max: "lots"\n')
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "bad-schema").mkdir()
    (tmp_path / "bad-schema" / "results.json").write_text('{"analyses": {}, "model": {"spec": 3}}')
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "results.json").write_text("{not json")
    return tmp_path


def _doc(model: dict, scores: list[list[float]]) -> dict:
    shape = [len(scores), len(scores[0])]
    record = {"name": "successor", "key": "k", "version": "1", "config": {}, "seconds": 0.1, "summary": "",
              "units": "u", "top_heads": [["L0H1", 1.0]], "result": {},
              "scores": {"name": "s", "units": "u", "shape": shape, "scores": scores}}
    return {"schema": "probe.scan/1", "command": "probe scan", "errors": {},
            "settings": {"analyses": ["successor"], "preset": "quick", "seed": 0},
            "model": {"architecture": "LlamaForCausalLM", "n_kv_heads": 4, "d_head": 16, "n_ctx": 256, **model},
            "analyses": {"successor": record}}


@pytest.fixture()
def scans(tmp_path: Path) -> dict[str, Path]:
    """Three scan folders: model A, another model B of the same shape, and a model C of another shape."""
    specs = {"a": ({"spec": "tiny-llama", "fingerprint": "aaaa", "n_layers": 2, "n_heads": 4}, [[0.1, 0.9, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]),
             "b": ({"spec": "tiny-gpt2", "fingerprint": "bbbb", "n_layers": 2, "n_heads": 4}, [[0.9, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]),
             "c": ({"spec": "other", "fingerprint": "cccc", "n_layers": 3, "n_heads": 4}, [[0.1, 0.2, 0.3, 0.4]] * 3)}
    folders = {}
    for name, (model, scores) in specs.items():
        folder = tmp_path / f"scan-{name}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_doc(model, scores)))
        folders[name] = folder
    return folders


# ---- the table -----------------------------------------------------------------------------------

RUN = ["run", *TINY, "--prompt", "the cat sat"]
SCAN = ["scan", *TINY, "--analyses", "successor"]

CASES = {
    # config files: bounded, sections and types checked before the model loads
    "yaml bomb": (SCAN + ["--out", "{tmp}/out", "--config", "{tmp}/bomb.yaml"], "expands to over"),
    "unknown config section": (SCAN + ["--out", "{tmp}/out", "--config", "{tmp}/typo.yaml"], "did you mean 'retrieval'"),
    "string for a number": (SCAN + ["--out", "{tmp}/out", "--config", "{tmp}/lots.yaml"], "successor.number_max"),
    "missing config": (SCAN + ["--out", "{tmp}/out", "--config", "{tmp}/nowhere.yaml"], "Cannot read config"),
    # silent wrong answers, now refused
    "empty --ablate": (RUN + ["--ablate", ""], "names no head"),
    "infinite --scale factor": (RUN + ["--scale", "L0H0:v=1e999"], "not a finite number"),
    "generate past the context": (RUN + ["--generate", "1000"], "plus 1000 generated tokens exceed the context of 256"),
    # tracebacks before
    "--scale 1.2.3": (RUN + ["--scale", "L0H0:v=1.2.3"], "'1.2.3' is not a number"),
    "--top -1": (RUN + ["--top", "-1"], "--top"),
    "--top 100000": (RUN + ["--top", "100000"], "vocabulary"),
    "--top not a number": (RUN + ["--top", "ten"], "not an integer"),
    "--generate -1": (RUN + ["--generate", "-1"], "--generate"),
    "surrogate-escaped prompt": (["run", *TINY, "--prompt", "caf\udcff"], "not valid UTF-8"),
    "--device banana": (RUN + ["--device", "banana"], "Unknown device 'banana'"),
    "--device meta": (RUN + ["--device", "meta"], "Unknown device 'meta'"),
    "--out is a file": (SCAN + ["--out", "{tmp}/a-file"], "is a file, not a folder"),
    "--out under a file": (SCAN + ["--out", "{tmp}/a-file/sub"], "Cannot create the --out folder"),
    "report: bad schema": (["report", "{tmp}/bad-schema"], "schema"),
    "report: not JSON": (["report", "{tmp}/bad-json"], "results.json"),
    "report: missing": (["report", "{tmp}/nowhere"], "does not exist"),
    "hf: missing folder": (["run", "--model", "hf:{tmp}/no/such/dir", "--prompt", "x"], "does not exist"),
    "hf: empty folder": (["run", "--model", "hf:{tmp}/empty-model", "--prompt", "x"], "no config.json"),
    "hf: a file": (["run", "--model", "hf:{tmp}/a-file", "--prompt", "x"], "is a file"),
    "--threads 100000": (["run", "--model", "tiny-llama", "--threads", "100000", "--prompt", "x"], "--threads"),
    "--threads -1": (["run", "--model", "tiny-llama", "--threads", "-1", "--prompt", "x"], "--threads"),
    "organism --threads 100000": (["organism", "refusal", "--threads", "100000"], "--threads"),
    "compare --top 0": (["compare", "{tmp}/bad-json", "{tmp}/bad-json", "--top", "0"], "--top"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, files, capsys, monkeypatch):
    monkeypatch.setenv("PROBE_HOME", str(files / "home"))
    args, word = CASES[name]
    code, _, err = run_cli(capsys, *(a.replace("{tmp}", str(files)) for a in args))
    assert_one_line_error(code, err, word)


def test_config_errors_come_before_the_model_loads(files, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    for config, word in (("bomb", "expands"), ("typo", "retreival"), ("lots", "number_max")):
        code, _, err = run_cli(capsys, *SCAN, "--out", str(files / "out"), "--config", str(files / f"{config}.yaml"))
        assert_one_line_error(code, err, word)
    code, _, err = run_cli(capsys, *SCAN, "--out", str(files / "a-file"))
    assert_one_line_error(code, err, "is a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(capsys):
    code, _, err = run_cli(capsys, *RUN, "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(files, capsys):
    locked = files / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *SCAN, "--out", str(locked / "out"))
    finally:
        locked.chmod(0o755)
    assert_one_line_error(code, err, "--out folder")


def test_non_utf8_prompt_bytes_in_argv(tmp_path):
    """Bytes that are not UTF-8 reach Python as surrogate escapes; the real command says so in one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROBE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable.encode(), b"-m", b"app.cli", b"run", b"--model", b"tiny-llama",
                             b"--threads", b"1", b"--prompt", b"caf\xff"], capture_output=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    err = result.stderr.decode("utf-8", "replace")
    assert_one_line_error(result.returncode, err, "not valid UTF-8 text (byte 0xff")


# ---- no NaN in JSON -----------------------------------------------------------------------------

def test_run_json_never_contains_nan(capsys):
    """An overflowing (finite) scale in float16 makes the intervened distribution NaN: null + a reason."""
    code, out, err = run_cli(capsys, "run", *TINY, "--dtype", "float16", "--prompt", "the cat",
                             "--scale", "L0H*:o=1e30", "--scale", "L1H*:v=1e30", "--json")
    assert code == 0, err
    data = strict_json(out)
    assert data["total_variation"] is None and data["kl"] is None
    assert data["intervened"]["top"][0]["prob"] is None
    assert ".total_variation (nan)" in data["non_finite"]["fields"]
    assert "null" in data["non_finite"]["reason"]
    assert "NaN or infinite" in err and "Traceback" not in err
    # and a healthy run has no such field
    code, out, _ = run_cli(capsys, "run", *TINY, "--prompt", "the cat", "--scale", "L0H0:v=2", "--json")
    assert code == 0 and "non_finite" not in strict_json(out)


def test_dumps_json_replaces_every_non_finite_float():
    text = dumps_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN"})
    data = strict_json(text)
    assert data["a"] is None and data["b"] == [1.0, None, {"c": None}] and data["d"] == "NaN"
    assert data["non_finite"]["fields"] == [".a (nan)", ".b[1] (inf)", ".b[2].c (-inf)"]


# ---- compare: different models ------------------------------------------------------------------

def test_compare_refuses_scans_of_different_shapes(scans, capsys):
    code, out, err = run_cli(capsys, "compare", str(scans["a"]), str(scans["c"]))
    assert_one_line_error(code, err, "different shapes")
    assert out == ""


def test_compare_warns_and_marks_scans_of_different_models(scans, capsys):
    code, out, err = run_cli(capsys, "compare", str(scans["a"]), str(scans["b"]))
    assert code == 0, err
    assert err.startswith("warning: A and B are scans of different models") and len(err.splitlines()) == 1
    assert out.startswith("DIFFERENT MODELS")
    code, out, err = run_cli(capsys, "compare", str(scans["a"]), str(scans["a"]))
    assert code == 0 and err == "" and not out.startswith("DIFFERENT")


# ---- config files, directly ----------------------------------------------------------------------

def test_config_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB.replace("bomb:", "retrieval:"))  # under a valid section, so only the budget stops it
    with pytest.raises(ProbeError, match="expands to over"):
        registry.read_config(path)


@pytest.mark.parametrize("text,word", [
    ("retrieval:\n  lengths: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper"),
    ("retrieval:\n  lengths: &a [1, *a]\n", "recursive"),
    ("a: &a [1]\nretrieval: {lengths: [" + ", ".join(["*a"] * 101) + "]}\n", "aliases"),
    ("retrieval: [\n", "not valid YAML at line 2"),
    ("- 1\n- 2\n", "must map analysis names"),
    ("successor: 3\n", "section 'successor' must map"),
    ("retreival:\n  lengths: [64]\n", "did you mean 'retrieval'"),
    ("banana:\n  x: 1\n", "unknown section 'banana' (sections:"),
])
def test_bad_config_files(tmp_path, text, word):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ProbeError) as raised:
        registry.read_config(path)
    message = str(raised.value)
    assert word in message and "\n" not in message


def test_config_size_and_encoding(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("#" * (registry.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ProbeError, match="bytes"):
        registry.read_config(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"retrieval:\n  x: caf\xe9\n")
    with pytest.raises(ProbeError, match="not UTF-8"):
        registry.read_config(latin)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert registry.read_config(empty) == {}
    fine = tmp_path / "fine.yaml"
    fine.write_text("successor:\n  number_max: 20\ncdt:\n")
    assert registry.read_config(fine) == {"successor": {"number_max": 20}, "cdt": {}}


@pytest.mark.parametrize("key,value,word", [
    ("number_max", "lots", "successor.number_max must be an integer, not 'lots' (str)"),
    ("number_max", True, "successor.number_max must be an integer"),  # bool is not an int
    ("number_max", 2.5, "successor.number_max must be an integer"),
    ("threshold", "high", "successor.threshold must be a number"),
    ("threshold", float("nan"), "successor.threshold must be a finite number"),
    ("wrap_around", 1, "successor.wrap_around must be true or false"),
    ("tasks", "numbers", "successor.tasks must be a list of (a string)"),
    ("tasks", ["numbers", 3], "successor.tasks[1] must be a string"),
    ("norm_convention", None, "successor.norm_convention must be a string"),
    ("numbr_max", 3, "'numbr_max' (did you mean 'number_max'?)"),
])
def test_config_types_are_checked_naming_the_key(key, value, word):
    with pytest.raises(ProbeError) as raised:
        registry.make_config(registry.ANALYZERS["successor"], "quick", {key: value})
    assert word in str(raised.value)


def test_config_values_are_converted_to_the_field_types():
    config = registry.make_config(registry.ANALYZERS["successor"], "quick",
                                  {"threshold": 1, "tasks": ["numbers", "days"], "number_max": 20})
    assert config.threshold == 1.0 and isinstance(config.threshold, float)
    assert config.tasks == ("numbers", "days") and config.number_max == 20


def test_check_setting_knows_optional_and_nested_tuples():
    assert registry.check_setting("k", None, int | None) is None
    assert registry.check_setting("k", 3, int | None) == 3
    assert registry.check_setting("k", [["a", "b"], ["c", "d"]], tuple[tuple[str, str], ...]) == (("a", "b"), ("c", "d"))
    with pytest.raises(ProbeError, match=r"k\[1\] must be a list of 2"):
        registry.check_setting("k", [["a", "b"], ["c"]], tuple[tuple[str, str], ...])
    with pytest.raises(ProbeError, match="integer or null"):
        registry.check_setting("k", "x", int | None)


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    """A bug (not a user mistake) is exit code 1 and one line, with the traceback on request."""
    monkeypatch.setattr(cli, "cmd_models", lambda args: 1 / 0)
    code, _, err = run_cli(capsys, "models")
    assert code == 1 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "unexpected ZeroDivisionError" in err
    monkeypatch.setenv("PROBE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["models"])


def test_help_still_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: probe" in capsys.readouterr().out
