"""The analyzers the faces know, by name: module, config and result classes, presets.

Each entry is imported lazily, so a face that lists analyzers does not pay for torch-heavy imports
of the ones it does not run. A module missing from this checkout is reported, not guessed at.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from probe.errors import ProbeError


@dataclass(frozen=True)
class AnalyzerEntry:
    name: str
    module: str
    config_class: str
    result_class: str
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)

    def result_type(self) -> type:
        return getattr(self.load(), self.result_class)

    def version(self) -> str:
        return str(getattr(self.load(), "VERSION", "0"))


ANALYZERS: dict[str, AnalyzerEntry] = {
    e.name: e
    for e in (
        AnalyzerEntry("retrieval", "analyses.retrieval", "RetrievalConfig", "RetrievalResult",
                      "retrieval heads (Wu et al. 2024): copy-paste score on needle-in-a-haystack"),
        AnalyzerEntry("successor", "analyses.successor", "SuccessorConfig", "SuccessorResult",
                      "successor heads (Gould et al. 2023): effective OV circuit increments"),
        AnalyzerEntry("safety", "analyses.safety", "SafetyConfig", "SafetyResult",
                      "safety heads: Ships score and Sahara group search"),
        AnalyzerEntry("factual", "analyses.factual", "FactualConfig", "FactualResult",
                      "factual-recall heads (Yu et al. 2023): memorised vs in-context answers"),
        AnalyzerEntry("cdt", "analyses.cdt", "CDTConfig", "CDTResult",
                      "CD-T: contextual decomposition circuits"),
        AnalyzerEntry("duo", "analyses.duo", "DuoConfig", "DuoResult",
                      "DuoAttention: learned retrieval/streaming gates"),
    )
}


def available() -> dict[str, AnalyzerEntry]:
    """Entries whose module imports in this checkout (an analyzer still being built is left out)."""
    found = {}
    for name, entry in ANALYZERS.items():
        try:
            module = entry.load()
        except ImportError:
            continue
        if hasattr(module, entry.config_class) and hasattr(module, "run"):
            found[name] = entry
    return found


def resolve(names: str) -> list[AnalyzerEntry]:
    """`all` or a comma-separated list → entries; unknown or unavailable names are a clear error."""
    present = available()
    if names.strip() == "all":
        return list(present.values())
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in ANALYZERS:
            raise ProbeError(f"Unknown analysis {name!r}; choose from {', '.join(ANALYZERS)} or all.")
        if name not in present:
            raise ProbeError(f"The {name} analysis is not available in this version of probe.")
        chosen.append(present[name])
    return chosen


def make_config(entry: AnalyzerEntry, preset: str = "default", overrides: dict[str, Any] | None = None,
                seed: int | None = None) -> Any:
    """The analyzer's config: a module-level preset (e.g. `QUICK`) if it has one, then overrides.

    Overrides are checked against the dataclass field types (`check_setting`): an unknown key or a value
    of the wrong type is a `ProbeError` naming `analysis.key`. Lists from YAML become tuples (configs
    are frozen dataclasses).
    """
    module = entry.load()
    config_type = entry.config_type()
    config = getattr(module, preset.upper(), None)
    if not isinstance(config, config_type):
        config = config_type()
    changes = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(config_type)}
    if seed is not None and "seed" in fields:
        changes["seed"] = seed
    unknown = sorted(set(changes) - fields, key=str)
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), fields, 1))
                 else repr(k) for k in unknown]
        raise ProbeError(f"{entry.name} has no setting(s) {', '.join(hints)}; it has: {', '.join(sorted(fields))}.")
    try:
        hints = typing.get_type_hints(config_type)
    except (NameError, TypeError):  # annotations that do not resolve here: pass values through unchecked
        hints = {}
    changes = {k: check_setting(f"{entry.name}.{k}", v, hints.get(k, Any)) for k, v in changes.items()}
    return dataclasses.replace(config, **changes)


# ---- setting types ---------------------------------------------------------------------------------

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(hint: Any) -> str:
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)}: [" + ", ".join(_describe(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_setting(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field type `hint` wants it (list → tuple, int → float), or a `ProbeError` naming `key`.

    Knows bool, int, float, str, `X | None` and `tuple[X, ...]` / `tuple[X, Y]`; bool is not an int
    here (`true` for a count is a mistake), numbers must be finite; other hints pass values through.
    """
    def bad() -> ProbeError:
        return ProbeError(f"Setting {key} must be {_describe(hint)}, not {_short(value)} "
                          f"({type(value).__name__}).")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise ProbeError(f"Setting {key} must be a finite number, not {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_setting(key, value, option)
            except ProbeError:
                continue
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_setting(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value))
        if len(value) != len(args):
            raise bad()
        return tuple(check_setting(f"{key}[{i}]", item, a) for i, (item, a) in enumerate(zip(value, args)))
    return tuple(value) if isinstance(value, list) else value


# ---- config files (`probe scan --config`) ----------------------------------------------------------

MAX_CONFIG_BYTES = 1_000_000  # a settings file is a few hundred bytes; this is far above any real one
MAX_CONFIG_NODES = 100_000    # values after aliases are expanded (a "billion laughs" file has ~10^9)
MAX_CONFIG_DEPTH = 20         # nesting (sections → settings → lists → lists of pairs is 4)
MAX_CONFIG_ALIASES = 100      # `*anchor` references


def read_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """A `{analysis: {setting: value}}` YAML file, bounded and checked before anything runs.

    Refused with a one-line `ProbeError`: a file over `MAX_CONFIG_BYTES`, not UTF-8, not YAML; more than
    `MAX_CONFIG_ALIASES` aliases, recursive aliases, more than `MAX_CONFIG_NODES` values once aliases
    are expanded or nesting deeper than `MAX_CONFIG_DEPTH` (so an alias bomb never expands); a top
    level that is not a mapping of analysis names to mappings; an unknown section (with the closest
    valid name). Setting names and types are checked by `make_config`, per analysis.
    """
    data = load_yaml(path, "Config")
    path = Path(path)
    if data is None:
        return {}
    example = "e.g. `retrieval: {lengths: [512, 1024]}`"
    if not isinstance(data, dict):
        raise ProbeError(f"Config {path} must map analysis names to settings, {example}; "
                         f"its top level is {_short(data)} ({type(data).__name__}).")
    return check_sections(data, f"Config {path}")


def check_sections(data: dict[Any, Any], where: str) -> dict[str, dict[str, Any]]:
    """`{analysis: {setting: value}}` with known analysis sections and string setting names (else a
    one-line `ProbeError` starting with `where`); a null section becomes `{}`."""
    example = "e.g. `retrieval: {lengths: [512, 1024]}`"
    for section, settings in data.items():
        if section not in ANALYZERS:
            close = difflib.get_close_matches(str(section), ANALYZERS, 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ProbeError(f"{where}: unknown section {_short(section)}{hint} "
                             f"(sections: {', '.join(ANALYZERS)}).")
        if settings is None:
            data[section] = settings = {}
        if not isinstance(settings, dict):
            raise ProbeError(f"{where}: section {section!r} must map setting names to values, {example}; "
                             f"it is {_short(settings)} ({type(settings).__name__}).")
        for key in settings:
            if not isinstance(key, str):
                raise ProbeError(f"{where}: setting names in {section!r} are strings, not {_short(key)}.")
    return data


def load_yaml(path: str | Path, what: str = "Config") -> Any:
    """A small YAML file parsed with the bounds of `read_config` (size, UTF-8, aliases, expansion, depth);
    `what` ("Config", "Plan") starts each one-line `ProbeError`."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ProbeError(f"{what} {path} is {size:,} bytes; a settings file is at most {MAX_CONFIG_BYTES:,}.")
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as error:
        raise ProbeError(f"Cannot read {what.lower()} {path}: {error.strerror or error}.") from error
    if len(raw) > MAX_CONFIG_BYTES:  # grew after stat, or a pipe/device that reports size 0
        raise ProbeError(f"{what} {path} is over {MAX_CONFIG_BYTES:,} bytes; a settings file is smaller.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProbeError(f"{what} {path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}).") from error
    loader = yaml.SafeLoader(text)
    try:
        _check_events(path, text, what)
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(path, node, what)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ProbeError(f"{what} {path} is not valid YAML{where}: {problem}.") from error
    finally:
        loader.dispose()
    return data


def _check_events(path: Path, text: str, what: str = "Config") -> None:
    """Nesting and alias count from the parser's event stream (no recursion, nothing built yet)."""
    import yaml

    depth = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ProbeError(f"{what} {path} nests deeper than {MAX_CONFIG_DEPTH} levels; settings are "
                                 "at most a few levels deep.")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_CONFIG_ALIASES:
                raise ProbeError(f"{what} {path} uses over {MAX_CONFIG_ALIASES} YAML aliases; "
                                 "write the settings out.")


def _check_expansion(path: Path, root: Any, what: str = "Config") -> None:
    """The number of values and the depth `root` stands for with aliases expanded, without expanding.

    Each distinct node is measured once (an alias shares its anchor's node) and memoised, so a bomb
    of 10^9 values costs a few dozen steps; the walk is iterative (alias chains can be deep).
    """
    import yaml

    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            measured[key] = (1, 1)
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        if children_done:
            on_path.discard(key)
            values = 1 + sum(measured[id(c)][0] for c in children)
            depth = 1 + max((measured[id(c)][1] for c in children), default=0)
            if values > MAX_CONFIG_NODES:
                raise ProbeError(f"{what} {path} expands to over {MAX_CONFIG_NODES:,} values through YAML "
                                 "aliases; a settings file is far smaller.")
            if depth > MAX_CONFIG_DEPTH:
                raise ProbeError(f"{what} {path} nests deeper than {MAX_CONFIG_DEPTH} levels through YAML "
                                 "aliases; settings are at most a few levels deep.")
            measured[key] = (values, depth)
        elif key in on_path:
            raise ProbeError(f"{what} {path} has a recursive YAML alias (a value that contains itself).")
        elif key not in measured:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children)
