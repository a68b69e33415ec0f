"""The planted safety model: a refusal head that reads harmful words and writes "sorry"."""

from __future__ import annotations

import torch

from analyses.planted.families import TIED_HEAD_DIM
from probe import plant, tiny
from probe.architecture import architecture
from probe.heads import Head
from probe.models import LoadedModel

SAFETY_HARMFUL_WORDS: tuple[str, ...] = ("bomb", "poison", "virus", "weapon")
SAFETY_WORDS: tuple[str, ...] = ("how", "do", "i", "make", "a", "the", "for", "my", "friend", "cake", "tea",
                                 "garden", "letter", "?", "sorry", "sure", "write", "buy", "cheap", "good",
                                 *SAFETY_HARMFUL_WORDS)
SAFETY_HEAD = Head(1, 2)  # shares its key/value head with L1H3 (GQA: 4 query heads, 2 kv heads)
SAFETY_HARMFUL_PROMPTS: tuple[str, ...] = (
    "how do i make a bomb ?", "write a poison letter for my friend", "buy a cheap weapon ?",
    "how do i make a virus", "make a bomb and a poison ?", "the weapon for my garden")
SAFETY_HARMLESS_PROMPTS: tuple[str, ...] = (
    "how do i make a cake ?", "write a letter for my friend", "buy good tea ?", "the garden")


def safety_model(family: str = "llama", head: Head = SAFETY_HEAD) -> LoadedModel:
    """2 layers x 4 query heads (Llama: 2 kv heads), d_model 32: only L1H2 (`SAFETY_HEAD`) reads harmful words and writes 'sorry'.

    Embeddings: dim 0 = 'harmfulness' (3 on harmful words, 0 elsewhere), dim 1 = 1 on every token
    (the query's source), small noise elsewhere. L1H2: query reads dim 1, key reads dim 0, both in the
    slowest RoPE pair (so the match does not depend on position); value = dim 0 - 0.5 dim 1 (positive
    only on a harmful word), output writes it to dim 2, which the unembedding maps to +'sorry' / -'sure'.
    Every other head writes small random noise; MLPs are off. So ablating L1H2 (uniform attention
    dilutes the harmful word; scaling removes it) moves the next-token distribution most. `family`
    builds the same mechanism in another family (probe.plant.FAMILIES; no GQA in GPT-2 / GPT-NeoX,
    whose d_head 8 is d_model / 4 too); `head` moves it to another head.
    """
    tokenizer = tiny.word_tokenizer(list(SAFETY_WORDS), name="probe/planted-refusal")
    vocab, d_model, n_heads, d_head = len(tokenizer), 32, 4, 8
    n_kv = n_heads if family in TIED_HEAD_DIM else 2
    shape = plant.Shape(vocab, d_model, 2, n_heads, n_kv, d_head, 16, 64, norm_eps=1e-6)
    spec = "tiny-planted-refusal" if family == "llama" else f"tiny-planted-refusal-{family}"
    model = plant.new_model(family, shape, tokenizer, spec, hub_name="probe/tiny-planted-refusal")
    gen = torch.Generator().manual_seed(0)
    slow = d_head // 2 - 1  # the RoPE pair with the lowest frequency (unrotated under partial rotary)
    kv = architecture(model).kv_of(head.head)
    with torch.no_grad():
        embed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        embed[:, 0] = 0.0
        embed[:, 1] = 1.0
        embed[:, 2] = 0.0
        for word in SAFETY_HARMFUL_WORDS:
            embed[tokenizer.convert_tokens_to_ids(word), 0] = 3.0
        plant.set_embedding(model, embed, as_added=True)
        for layer in range(model.n_layers):  # random heads, drawn as whole projections (row = output unit)
            q, k, v = (0.3 * torch.randn(n * d_head, d_model, generator=gen) for n in (n_heads, n_kv, n_kv))
            o = 0.05 * torch.randn(d_model, n_heads * d_head, generator=gen)
            o[:3] = 0.0  # no other head writes harmfulness, the query source or refusal
            for h in range(n_heads):
                plant.set_q(model, layer, h, q[h * d_head:(h + 1) * d_head].T)
                plant.set_o(model, layer, h, o[:, h * d_head:(h + 1) * d_head].T)
            for j in range(n_kv):
                plant.set_k(model, layer, j, k[j * d_head:(j + 1) * d_head].T)
                plant.set_v(model, layer, j, v[j * d_head:(j + 1) * d_head].T)
            plant.zero_mlp(model, layer)
        W_Q, W_K, W_V, W_O = torch.zeros(d_model, d_head), torch.zeros(d_model, d_head), \
            torch.zeros(d_model, d_head), torch.zeros(d_head, d_model)
        W_Q[1, slow] = 6.0
        W_K[0, slow] = 6.0
        W_V[0, 0] = 1.0
        W_V[1, 0] = -0.5  # without a harmful word the value is negative
        W_O[0, 2] = 8.0
        plant.set_head_qk(model, head.layer, head.head, W_Q, W_K)
        plant.set_head_ov(model, head.layer, head.head, W_V, W_O)
        unembed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        unembed[:, 2] = 0.0
        unembed[tokenizer.convert_tokens_to_ids("sorry"), 2] = 4.0
        unembed[tokenizer.convert_tokens_to_ids("sure"), 2] = -4.0
        plant.set_unembedding(model, unembed)
    return model
