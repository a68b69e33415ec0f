"""Tiny random-weight configs of the model families users bring, saved as Hugging Face folders.

Each builder makes a seeded random model of one family (3 layers, d_model 64, 4 query heads, 2
key/value heads where the family has grouped-query attention), saves it with `save_pretrained`
together with probe's word-level tokenizer, and returns the folder: the user's own path, loaded with
`load_model("hf:<folder>")` exactly as a user would. Used by the architecture proof matrix
(tests/families/test_architectures_*.py).

Seen with transformers 5.23: a folder whose config says `qwen2` gets `Qwen2Tokenizer` from
`AutoTokenizer` whatever `tokenizer_config.json` names, and that class re-splits the word-level
vocabulary into characters ("the" -> t, h, e). The Qwen2 row therefore runs on character tokens,
as a user's Qwen2 folder with such a tokenizer would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from probe import tiny

D_MODEL, N_LAYERS, N_HEADS, N_KV, D_MLP, N_CTX = 64, 3, 4, 2, 128, 256
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def _common(vocab: int) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": D_MODEL, "intermediate_size": D_MLP,
            "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
            "max_position_embeddings": N_CTX, "tie_word_embeddings": False, **SPECIAL}


def _llama(v: int) -> Any:
    return transformers.LlamaConfig(**_common(v))


def _mistral(v: int) -> Any:
    return transformers.MistralConfig(**_common(v), sliding_window=None)


def _mixtral(v: int) -> Any:
    return transformers.MixtralConfig(**_common(v), num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)


def _qwen2(v: int) -> Any:
    return transformers.Qwen2Config(**_common(v), use_sliding_window=False)


def _qwen3(v: int) -> Any:
    return transformers.Qwen3Config(**_common(v), head_dim=D_MODEL // N_HEADS, use_sliding_window=False)


def _qwen3_moe(v: int) -> Any:
    return transformers.Qwen3MoeConfig(**_common(v), head_dim=D_MODEL // N_HEADS, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                                       mlp_only_layers=[], use_sliding_window=False)


def _gemma2(v: int) -> Any:
    return transformers.Gemma2Config(**_common(v), head_dim=D_MODEL // N_HEADS, query_pre_attn_scalar=16,
                                     sliding_window=8, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0)


def _gemma3(v: int) -> Any:
    return transformers.Gemma3TextConfig(**_common(v), head_dim=D_MODEL // N_HEADS, query_pre_attn_scalar=16,
                                         sliding_window=8, sliding_window_pattern=2)


def _phi3(v: int) -> Any:
    return transformers.Phi3Config(**_common(v), sliding_window=None)


def _olmo2(v: int) -> Any:
    return transformers.Olmo2Config(**_common(v))


def _gpt_neox(v: int) -> Any:
    # Pythia-style: parallel attention + MLP, partial rotary (a quarter of d_head), packed qkv, no GQA.
    return transformers.GPTNeoXConfig(vocab_size=v, hidden_size=D_MODEL, intermediate_size=D_MLP,
                                      num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                      rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=N_CTX,
                                      tie_word_embeddings=False, **SPECIAL)


def _gpt2(v: int) -> Any:
    return transformers.GPT2Config(vocab_size=v, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                   n_positions=N_CTX, bos_token_id=1, eos_token_id=2)


# family -> (config builder, model class name)
FAMILIES: dict[str, tuple[Callable[[int], Any], str]] = {
    "llama": (_llama, "LlamaForCausalLM"),
    "mistral": (_mistral, "MistralForCausalLM"),
    "mixtral": (_mixtral, "MixtralForCausalLM"),
    "qwen2": (_qwen2, "Qwen2ForCausalLM"),
    "qwen3": (_qwen3, "Qwen3ForCausalLM"),
    "qwen3_moe": (_qwen3_moe, "Qwen3MoeForCausalLM"),
    "gemma2": (_gemma2, "Gemma2ForCausalLM"),
    "gemma3": (_gemma3, "Gemma3ForCausalLM"),
    "phi3": (_phi3, "Phi3ForCausalLM"),
    "olmo2": (_olmo2, "Olmo2ForCausalLM"),
    "gpt_neox": (_gpt_neox, "GPTNeoXForCausalLM"),
    "gpt2": (_gpt2, "GPT2LMHeadModel"),
}
def _mamba(v: int) -> Any:
    return transformers.MambaConfig(vocab_size=v, hidden_size=D_MODEL, num_hidden_layers=2, state_size=4, **SPECIAL)


# Families the bridge boots but the architecture layer does not cover (no attention): a clear error.
UNCOVERED: dict[str, tuple[Callable[[int], Any], str]] = {"mamba": (_mamba, "MambaForCausalLM")}
# Grouped-query attention (4 query heads on 2 KV heads) where the family has it.
GQA = {name for name in FAMILIES if name not in ("gpt_neox", "gpt2")}


def build_folder(family: str, root: Path, seed: int = 0) -> Path:
    """Save a seeded random `family` model and the word tokenizer into `root/family`; return the folder."""
    folder = Path(root) / family
    if (folder / "config.json").is_file():
        return folder
    make_config, class_name = FAMILIES[family] if family in FAMILIES else UNCOVERED[family]
    tokenizer = tiny.word_tokenizer(name=f"probe/{family}")
    config = make_config(len(tokenizer))
    config.architectures = [class_name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    _spread_norms(model, seed)
    _sharpen(model, family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _spread_norms(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights and biases (a fresh model has ones/zeros, Gemma's 1 + w zeros): a check that
    drops a norm weight or a bias, or applies Gemma's offset twice, must see a difference."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


# Weights scaled up after the random init, where a default init hides a component (a tiny Gemma 2's
# logits move by only 6e-5 without soft-capping). Attention scores of ~0.03 sit in the linear
# part of tanh and barely depend on positions; with these factors switching off the attention and final
# soft-caps (Gemma 2) or rotating all of d_head instead of a quarter (GPT-NeoX) moves the logits by
# > 1e-2 (tests/families/test_architectures_components.py, test_switching_off_a_component_moves_the_logits), and every
# intervention kind moves them by > 1e-3 (GPT-2's flat default attention hid uniform attention).
SHARPEN: dict[str, dict[str, float]] = {
    "gemma2": {"q_proj.weight": 10.0, "k_proj.weight": 10.0, "lm_head.weight": 10.0},
    "gpt_neox": {"query_key_value.weight": 6.0},
    "gpt2": {"c_attn.weight": 4.0},  # uniform attention moved its logits by 2e-4 only
}


def _sharpen(model: torch.nn.Module, family: str) -> None:
    factors = SHARPEN.get(family, {})
    with torch.no_grad():
        for name, param in model.named_parameters():
            for suffix, factor in factors.items():
                if name.endswith(suffix):
                    param.mul_(factor)


def load_hf_copy(folder: Path) -> torch.nn.Module:
    """An independent Hugging Face copy of the folder (eager attention, float32): not the bridged one."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()
