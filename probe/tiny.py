"""Tiny models built locally (no download): random or hand-set weights, an in-process tokenizer.

They exist so that every analyzer can be tested in milliseconds on a model whose answer is known
(a planted mechanism), and so that the CLI and the app can be tried without any asset.
"""

from __future__ import annotations

import calendar
import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<bos>", "<eos>", "<pad>")

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
ORDINAL_WORDS = ("first second third fourth fifth sixth seventh eighth ninth tenth").split()
COMMON_WORDS = (
    "the a an of to is was and in on at for with from by as it he she they we you i "
    "capital city country answer question q: a: what who where when which . , ! ? : ; "
    "then gave went said likes book story needle key secret number day month year "
    "mary john alice bob tom anna paul kate mark lucy store park school office"
).split()


def default_vocabulary() -> list[str]:
    """Words the tiny models know: enough for every task's prompts to tokenize word by word."""
    words: list[str] = list(SPECIAL_TOKENS)
    days = list(calendar.day_name)
    months = list(calendar.month_name)[1:]
    candidates = (
        [str(i) for i in range(201)]
        + NUMBER_WORDS + ORDINAL_WORDS
        + days + [d.lower() for d in days] + [d[:3] for d in days]
        + months + [m.lower() for m in months] + [m[:3] for m in months]
        + list(string.ascii_lowercase) + list(string.ascii_uppercase)
        + COMMON_WORDS
    )
    for word in candidates:
        if word not in words:
            words.append(word)
    return words


def word_tokenizer(words: list[str] | None = None, name: str = "probe/tiny") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` that prepends `<bos>`, built in-process."""
    words = list(words or default_vocabulary())
    for special in reversed(SPECIAL_TOKENS):
        if special not in words:
            words.insert(0, special)
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", add_bos_token=True, name_or_path=name,
    )


def tiny_llama(vocab_size: int, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 4,
               d_model: int = 64, d_mlp: int = 128, n_ctx: int = 256, seed: int = 0) -> PreTrainedModel:
    """A seeded random Llama-architecture model (RMSNorm, RoPE, SwiGLU; GQA when n_kv_heads < n_heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def tiny_gpt2(vocab_size: int, n_layers: int = 2, n_heads: int = 4, d_model: int = 64,
              n_ctx: int = 256, seed: int = 0) -> PreTrainedModel:
    """A seeded random GPT-2-shaped model (LayerNorm, GELU, learned positions)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                        n_positions=n_ctx, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    model.config.architectures = ["GPT2LMHeadModel"]
    return model
