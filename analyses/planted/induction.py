"""A tiny GPT-2 with a planted two-head induction circuit (previous-token head → induction head).

Residual layout (d_model 80): token one-hot [0:16), position one-hot [16:32), "previous token"
[32:48) (written by L0H0), "answer" [48:64) (written by L1H0, read by the unembedding), junk [64:80)
(written by the distractor heads, read by nobody). MLPs are zero.

- L0H0, previous-token head: query = position p, key = position p − 1; value = token; writes the
  previous token into [32:48).
- L1H0, induction head: query = current token, key = previous-token slot; so on "… a b … a" it
  attends to b and copies b into the answer slot; the unembedding reads the answer slot.
- L0H1–3, L1H1–3: random attention, outputs into the junk slot only.

On "<bos> c f a h b d a" the model predicts "h" (the token after the earlier "a"). The circuit is
exactly {L0H0 → L1H0 → logits}; L0H0 reaches L1H0 through its keys only.
"""

from __future__ import annotations

import random

import torch

from analyses.cdt.tasks import LogitDiffBatch
from probe import plant
from probe.heads import Head
from probe.models import LoadedModel
from probe.tiny import word_tokenizer

LETTERS = list("abcdefghijkl")
WORDS = ["<unk>", "<bos>", "<eos>", "<pad>", *LETTERS]  # 16 tokens
N_CTX = 16
TOK, POS, PREV, OUT, JUNK = 0, 16, 32, 48, 64
PLANTED = (Head(0, 0), Head(1, 0))
PREVIOUS_TOKEN_HEAD, INDUCTION_HEAD = PLANTED


def planted_induction_model(seed: int = 0) -> LoadedModel:
    """The planted model, wrapped like any other (bridge, tokenizer, facts), written through the
    planting layer (`probe.plant`: per-head weights, whatever the family stores them as)."""
    gen = torch.Generator().manual_seed(seed)
    d, dh, H = 80, 20, 4
    shape = plant.Shape(vocab=len(WORDS), d_model=d, n_layers=2, n_heads=H, n_kv_heads=H, d_head=dh, d_mlp=4 * d,
                        n_ctx=N_CTX)
    model = plant.new_model("gpt2", shape, word_tokenizer(WORDS, name="probe/planted-induction"),
                            "planted-induction", hub_name="probe/planted-induction")  # zeroed, norms identity
    embed = torch.zeros(len(WORDS), d)
    embed[:, TOK:TOK + 16] = torch.eye(16)
    plant.set_embedding(model, embed)
    positions = torch.zeros(N_CTX, d)
    positions[:, POS:POS + 16] = torch.eye(16)
    plant.set_learned_positions(model, positions)
    heads = {(layer, head): [torch.zeros(d, dh) for _ in range(3)] + [torch.zeros(dh, d)]
             for layer in range(2) for head in range(H)}  # W_Q, W_K, W_V, W_O per head
    # L0H0: previous-token head
    W_Q, W_K, W_V, W_O = heads[(0, 0)]
    for p in range(16):
        W_Q[POS + p, p] = 1.5
        if p + 1 < 16:
            W_K[POS + p, p + 1] = 1.5
    for t in range(16):
        W_V[TOK + t, t] = 1.0
        W_O[t, PREV + t] = 0.16
    # L1H0: induction head
    W_Q, W_K, W_V, W_O = heads[(1, 0)]
    for t in range(16):
        W_Q[TOK + t, t] = 2.0
        W_K[PREV + t, t] = 2.0
        W_V[TOK + t, t] = 1.0
        W_O[t, OUT + t] = 0.2
    # distractors: random attention reading tokens and positions, writing junk only
    for layer in range(2):
        for head in (1, 2, 3):
            for kind in range(3):
                heads[(layer, head)][kind][:JUNK] = 0.3 * torch.randn(JUNK, dh, generator=gen)
            heads[(layer, head)][3][:, JUNK:] = 0.02 * torch.randn(dh, 16, generator=gen)
    for (layer, head), (W_Q, W_K, W_V, W_O) in heads.items():
        plant.set_head_qk(model, layer, head, W_Q, W_K)
        plant.set_head_ov(model, layer, head, W_V, W_O)
    unembed = torch.zeros(len(WORDS), d)
    unembed[:, OUT:OUT + 16] = 10.0 * torch.eye(16)
    plant.set_unembedding(model, unembed)
    return model


def induction_batch(model: LoadedModel, n: int = 12, length: int = 7, seed: int = 0) -> LogitDiffBatch:
    """"<bos> x1 … x7 xi" → x(i+1); foil = the repeated token itself. Mean sources: no repeat."""
    rng = random.Random(seed)
    texts, good, bad, mean_sources = [], [], [], []
    vocab = model.tokenizer.get_vocab()
    for _ in range(n):
        seq = rng.sample(LETTERS, length)
        i = rng.randrange(length - 1)
        texts.append(" ".join(seq + [seq[i]]))
        good.append(vocab[seq[i + 1]])
        bad.append(vocab[seq[i]])
        mean_sources.append(" ".join(rng.sample(LETTERS, length + 1)))
    ids = torch.cat([model.encode(t) for t in texts])
    mean_source_ids = torch.cat([model.encode(t) for t in mean_sources])
    return LogitDiffBatch("planted-induction", ids, torch.tensor(good), torch.tensor(bad), mean_source_ids, texts)



def induction_model(seed: int = 0) -> LoadedModel:
    """Tiny GPT-2 with a planted induction circuit: `PREVIOUS_TOKEN_HEAD` (L0H0) -> `INDUCTION_HEAD` (L1H0) -> logits.

    Built by `planted_induction_model` (the module docstring gives the residual layout);
    the other heads have random attention and write into a slot nobody reads. Use with the CD-T task
    "planted-induction" or `induction_batch`.
    """
    return planted_induction_model(seed)
