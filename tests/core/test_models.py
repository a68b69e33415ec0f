"""Model specs load offline, expose the right facts, and the bridge reproduces the HF logits."""

from __future__ import annotations

import pytest
import torch

from probe.errors import ProbeError, PromptTooLongError, UnknownModelError
from probe.models import SPECS, facts, list_specs, load_model


@pytest.mark.parametrize("spec,n_heads,n_kv", [("tiny-llama", 4, 4), ("tiny-gqa", 4, 2), ("tiny-gpt2", 4, 4)])
def test_tiny_specs_have_the_right_shape_and_match_hf(spec, n_heads, n_kv):
    model = load_model(spec, device="cpu")
    assert (model.n_layers, model.n_heads, model.n_kv_heads) == (2, n_heads, n_kv)
    assert [model.kv_head_of(h) for h in range(n_heads)] == [h // (n_heads // n_kv) for h in range(n_heads)]
    ids = model.encode("the capital of mary is")
    assert ids[0, 0].item() == model.tokenizer.bos_token_id
    torch.testing.assert_close(model.logits(ids), model.hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_tiny_models_are_seeded():
    a, b = load_model("tiny-gqa", device="cpu"), load_model("tiny-gqa", device="cpu")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != load_model("tiny-llama", device="cpu").fingerprint


def test_unknown_spec_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as error:
        load_model("gpt-5")
    for name in SPECS:
        assert name in str(error.value)
    assert "hf:" in str(error.value) and "gguf:" in str(error.value)


def test_bad_paths_are_clear(tmp_path):
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model(f"gguf:{tmp_path / 'missing.gguf'}")
    with pytest.raises(UnknownModelError, match="Could not load"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ProbeError, match="dtype"):
        load_model("tiny-llama", dtype="int3")


def test_hf_folder_spec_round_trip(tmp_path, tiny_llama):
    from probe import tiny

    # a fresh copy: booting the bridge rewires the wrapped HF model's modules, so save before wrapping
    tiny.tiny_llama(len(tiny_llama.tokenizer)).save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    again = load_model(f"hf:{tmp_path}", device="cpu")
    ids = tiny_llama.encode("the book of john")
    torch.testing.assert_close(again.logits(ids), tiny_llama.logits(ids))


def test_prompt_longer_than_context(tiny_llama):
    with pytest.raises(PromptTooLongError, match="context of 256"):
        tiny_llama.check_fits(300)


def test_models_listing_reports_availability():
    listed = {spec.name: available for spec, available in list_specs()}
    assert listed["tiny-llama"] is True
    assert set(listed) == set(SPECS)


@pytest.mark.embedded
def test_smollm2_loads_offline_and_matches_hf(smollm2):
    info = facts(smollm2)
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["d_head"]) == (30, 9, 3, 64)
    assert info["n_ctx"] == 8192 and info["chat_template"]
    ids = smollm2.encode("The capital of France is")
    bridged = smollm2.logits(ids)
    torch.testing.assert_close(bridged, smollm2.hf_model(ids).logits, atol=1e-4, rtol=1e-4)
    assert smollm2.decode([int(bridged[0, -1].argmax())]) == " Paris"
    assert "<|im_start|>" in smollm2.chat_prompt("Hi")


@pytest.mark.embedded
def test_gemma3_loads_offline_and_matches_hf(gemma3):
    assert (gemma3.n_layers, gemma3.n_heads, gemma3.n_kv_heads, gemma3.d_head) == (18, 4, 1, 256)
    ids = gemma3.encode("The capital of France is")
    assert ids[0, 0].item() == gemma3.tokenizer.bos_token_id
    torch.testing.assert_close(gemma3.logits(ids), gemma3.hf_model(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ProbeError, match="plain template"):
        gemma3.chat_prompt("Hi")


def test_registered_spec_loads_through_the_core(monkeypatch):
    from probe import models

    monkeypatch.setitem(models.REGISTERED_SPECS, "x", models.RegisteredSpec(
        "x", "an organism", lambda device, dtype: load_model("tiny-llama", device=device, dtype=dtype),
        lambda: True))
    assert load_model("x", device="cpu").n_layers == 2
    assert "x " in models.spec_summary()
    monkeypatch.setitem(models.REGISTERED_SPECS, "y", models.RegisteredSpec("y", "unbuilt", lambda d, t: None,
                                                                            lambda: False, "run `probe organism refusal`"))
    with pytest.raises(UnknownModelError, match="probe organism refusal"):
        load_model("y")


def test_recomputing_layers_keeps_dropout_off(tmp_path):
    """`recompute_layers_in_backward` puts the HF model in training mode (HF recomputes only there); dropout
    must stay off in it (the GPT-2 family has p = 0.1), and come back as it was after the block."""
    from families import build_folder  # tests/ is on sys.path

    model = load_model(f"hf:{build_folder('gpt2', tmp_path)}", device="cpu")
    rates = [m.p for m in model.hf_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert max(rates) > 0
    ids = model.encode("the capital of mary is the book of john")
    outside = model.hf_model(ids).logits
    with model.recompute_layers_in_backward():
        assert model.hf_model.training
        inside = model.hf_model(ids).logits
    torch.testing.assert_close(inside, outside, atol=1e-6, rtol=1e-6)
    assert [m.p for m in model.hf_model.modules() if isinstance(m, torch.nn.Dropout)] == rates
    assert not model.hf_model.training
