"""Scan result documents read back by `probe report` and `probe compare`: `results.json` parsed and checked
against docs/results.schema.json, every problem one `ProbeError` naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.cli_output import _one_line
from probe.errors import ProbeError


SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "results.schema.json"
_DOCUMENT_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError)


def read_document(folder: str | Path) -> dict[str, Any]:
    """A scan folder's `results.json`, parsed and checked against docs/results.schema.json."""
    from analyses.report import load_document

    path = Path(folder) / "results.json"
    try:
        document = load_document(Path(folder))
    except OSError as error:
        raise ProbeError(f"Cannot read {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise ProbeError(f"{path} is not UTF-8 text (offset {error.start}); it is not a probe scan result.") from None
    except json.JSONDecodeError as error:
        raise ProbeError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None
    if not isinstance(document, dict):
        raise ProbeError(f"{path} is not a probe scan result (its top level is a {type(document).__name__}).")
    if SCHEMA_FILE.is_file():
        import jsonschema

        schema = json.loads(SCHEMA_FILE.read_text())
        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(document))
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "top level"
            raise ProbeError(f"{path} does not follow the scan schema ({SCHEMA_FILE.name}) at {where}: "
                             f"{_one_line(error.message, 160)}.")
    return document


def _model_line(model: dict[str, Any]) -> str:
    return f"{model.get('spec')} ({model.get('n_layers')} layers x {model.get('n_heads')} heads, {model.get('fingerprint')})"
