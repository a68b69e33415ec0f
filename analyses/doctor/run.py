"""`doctor(model)`: load the model in float32, read its family through the architecture layer, build the
independent copy and run each check, timing every phase."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from analyses.common import Progress, no_progress
from analyses.doctor.checks import CHECKS, RUNNERS, SCALED, TOLERANCES, _Failed, _Inconclusive
from analyses.doctor.context import Context, DoctorError, DoctorSize, independent_copy
from analyses.doctor.report import Check, DoctorResult
from probe.architecture import ArchitectureError, MissingComponentError, architecture
from probe.errors import ProbeError
from probe.models import LoadedModel, load_model


def _adapter_name(model: LoadedModel) -> str:
    adapter = getattr(model.bridge, "adapter", None)
    return type(adapter).__name__ if adapter is not None else "?"


def _missing_component(error: ProbeError) -> str:
    return getattr(error, "component", None) or str(error)


def doctor(model: LoadedModel | str, size: DoctorSize = DoctorSize(), progress: Progress | None = None,
           device: str | None = None, only: Sequence[str] | None = None) -> DoctorResult:
    """Run the checks on `model` (a `LoadedModel` in float32, or a spec to load). `only` restricts to
    some check names (the app and tests); the result says per check its number, tolerance, pass/fail.
    `progress(fraction, message)` hears of the load, the copy and each check's start and end."""
    say = progress or no_progress
    start, cpu_start = time.perf_counter(), time.process_time()
    phases: dict[str, dict[str, float]] = {}

    def phase(name: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        phases[name] = {"seconds": round(now[0] - since[0], 2), "cpu_seconds": round(now[1] - since[1], 2)}
        return now

    mark = (start, cpu_start)
    if isinstance(model, str):
        say(0.0, f"loading {model}")
        model = load_model(model, device=device, dtype="float32", progress=lambda message: say(0.0, message))
        mark = phase("load", mark)
    if model.dtype != torch.float32:
        raise DoctorError(f"doctor checks {model.spec} in float32 (its tolerances are fp32's); it is loaded in "
                          f"{str(model.dtype).replace('torch.', '')}: load it with dtype float32.")
    unknown = sorted(set(only or ()) - set(RUNNERS))
    if unknown:
        raise DoctorError(f"Unknown doctor check(s) {', '.join(unknown)}; known: {', '.join(RUNNERS)}.")
    result = DoctorResult(spec=model.spec, fingerprint=model.fingerprint, architecture=model.architecture,
                          adapter=_adapter_name(model), copy="", supported=True, missing_component=None,
                          facts={}, threads=torch.get_num_threads(), phases=phases)
    try:
        arch = architecture(model)
        result.facts = arch.summary()
    except ArchitectureError as error:  # MissingComponentError names the component
        result.supported = False
        result.missing_component = _missing_component(error) if isinstance(error, MissingComponentError) else str(error)
        result.checks = [Check(0, "architecture layer", "the architecture layer reads the family", passed=False,
                               detail=str(error))]
        result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return result
    say(0.0, f"{model.architecture} through {result.adapter}: loading an independent Hugging Face copy")
    copy, result.copy = independent_copy(model)
    mark = phase("copy", mark)
    layer = size.layer if size.layer is not None else model.n_layers // 2
    if not 0 <= layer < model.n_layers:
        raise DoctorError(f"Layer {layer} does not exist; {model.spec} has {model.n_layers} layers.")
    ctx = Context(model, copy, size, layer)
    for number, (name, what) in enumerate(CHECKS, start=1):
        if only and name not in only and name != "logits":  # logits sets the tolerance scale
            continue
        say((number - 1) / len(CHECKS), f"check {number}/{len(CHECKS)}: {name}")
        check = Check(number, name, what, tolerance=TOLERANCES[name])
        began = time.perf_counter()
        try:
            check.value, check.detail = RUNNERS[name](ctx)
            if name in SCALED:
                check.tolerance = TOLERANCES[name] * ctx.sizes.get(name, ctx.scale)
            check.passed = bool(check.value <= check.tolerance)
        except _Inconclusive as skipped:
            check.value, check.detail, check.passed = skipped.value, f"skipped: {skipped.why}", None
        except _Failed as failed:
            check.value, check.detail, check.passed = failed.value, failed.why, False
        except MissingComponentError as error:
            check.detail, check.passed = f"unsupported: {error}", False
        except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check, with its reason
            check.detail, check.passed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False
        check.seconds = time.perf_counter() - began
        result.checks.append(check)
        state = "skip" if check.passed is None else ("pass" if check.passed else "FAIL")
        say(number / len(CHECKS), f"check {number}/{len(CHECKS)}: {name}: {state} ({check.seconds:.1f} s)")
    phase("checks", mark)
    result.threads = torch.get_num_threads()
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    del copy
    return result
