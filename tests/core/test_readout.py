"""probe.readout on every family of tests/support/families.py (random norm weights and biases, Gemma's 1 + w,
Gemma 2's final logit soft-cap), against the model's own logits:

- `logits_from_normalized(apply_final_norm(resid_final))` == the model's logits (all families), also
  restricted to a few ids;
- `direction_logits(resid_final, clean scale)` == the model's logits minus b_U (the final LayerNorm's
  bias read out separately: it belongs to no component), on the families without a soft-cap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import FAMILIES, build_folder
from probe import readout
from probe.architecture import architecture
from probe.models import LoadedModel, load_model

TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ATOL = 1e-4
_LOADED: dict[str, LoadedModel] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readout")


def _run(name: str, root: Path) -> tuple[LoadedModel, torch.Tensor, torch.Tensor]:
    """(model, final residual [T, d] = ln_final's input, the model's logits [T, vocab])."""
    if name not in _LOADED:
        _LOADED[name] = load_model(f"hf:{build_folder(name, root)}", device="cpu")
    model = _LOADED[name]
    ids = model.encode(TEXT)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: n == "ln_final.hook_in")
    return model, cache["ln_final.hook_in"][0], logits[0].float()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_readout_equals_the_models_logits(name, root):
    model, resid, logits = _run(name, root)
    with torch.no_grad():
        normalized = readout.apply_final_norm(model, resid)
        got = readout.logits_from_normalized(model, normalized)
        ids = [5, 17, 3]
        few = readout.logits_from_normalized(model, normalized, ids)
        log_probs = readout.log_probs_from_normalized(model, normalized)
    assert float((got - logits).abs().max()) <= ATOL
    assert float((few - logits[:, ids]).abs().max()) <= ATOL
    assert float((log_probs - torch.log_softmax(logits, -1)).abs().max()) <= ATOL
    if name == "gemma2":  # the soft-cap is applied (30 in tests/support/families.py) and bounds the logits
        assert architecture(model).softcap_logits == 30.0 and float(got.abs().max()) < 30.0


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gemma2"])
def test_direction_logits_of_the_final_residual_are_the_logits_minus_b_U(name, root):
    model, resid, logits = _run(name, root)
    arch = architecture(model)
    assert arch.softcap_logits is None
    scale = readout.final_scale(model, resid)
    with torch.no_grad():
        got = readout.direction_logits(model, resid, scale).float()
        if arch.final_norm.bias is not None:  # LayerNorm families: the norm's own bias, read out alone
            assert readout.is_layer_norm(model)
            got = got + readout.unembed(model, arch.final_norm.bias).float()
    expected = logits - (arch.b_U if arch.b_U is not None else 0.0)
    assert float((got - expected).abs().max()) <= ATOL
    # linear: two halves of the residual add up to the whole with the scale frozen
    halves = readout.direction_logits(model, resid / 3, scale) + readout.direction_logits(model, 2 * resid / 3, scale)
    assert float((halves - readout.direction_logits(model, resid, scale)).abs().max()) <= ATOL
    assert torch.equal(readout.final_norm_weight(model), arch.final_norm.weight)


def test_an_unembedding_bias_is_added_to_the_exact_readout_only(root, monkeypatch):
    """No family here has an unembedding bias: one is patched onto the layer, so the exact read-out must
    add it (all ids and a few, each its own entry) and the linear DLA read-out must not."""
    from probe.architecture import Architecture

    model, resid, logits = _run("llama", root)
    bias = torch.linspace(-1.0, 1.0, logits.shape[-1])
    monkeypatch.setattr(Architecture, "b_U", property(lambda self: bias))
    ids = [7, 2, 40]
    with torch.no_grad():
        normalized = readout.apply_final_norm(model, resid)
        assert float((readout.logits_from_normalized(model, normalized) - (logits + bias)).abs().max()) <= ATOL
        few = readout.logits_from_normalized(model, normalized, ids)
        assert float((few - (logits + bias)[:, ids]).abs().max()) <= ATOL
        scale = readout.final_scale(model, resid)
        assert float((readout.direction_logits(model, resid, scale).float() - logits).abs().max()) <= ATOL
