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
from transformers import GPT2Config, GPT2LMHeadModel

from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.models import LoadedModel, wrap_hf_model
from probe.tiny import word_tokenizer

LETTERS = list("abcdefghijkl")
WORDS = ["<unk>", "<bos>", "<eos>", "<pad>", *LETTERS]  # 16 tokens
N_CTX = 16
TOK, POS, PREV, OUT, JUNK = 0, 16, 32, 48, 64
PLANTED = (Head(0, 0), Head(1, 0))


def planted_induction_model(seed: int = 0) -> LoadedModel:
    """The planted model, wrapped like any other (bridge, tokenizer, facts)."""
    gen = torch.Generator().manual_seed(seed)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=80, n_layer=2, n_head=4, n_positions=N_CTX,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    d, dh = 80, 20
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        body = model.transformer
        for block in body.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
        body.ln_f.weight.fill_(1.0)
        body.wte.weight[:, TOK:TOK + 16] = torch.eye(16)
        body.wpe.weight[:, POS:POS + 16] = torch.eye(16)

        def cols(kind: int, head: int) -> slice:  # kind 0 q, 1 k, 2 v within c_attn
            return slice(kind * d + head * dh, kind * d + (head + 1) * dh)

        # L0H0: previous-token head
        a0 = body.h[0].attn
        for p in range(16):
            a0.c_attn.weight[POS + p, cols(0, 0).start + p] = 1.5
            if p + 1 < 16:
                a0.c_attn.weight[POS + p, cols(1, 0).start + p + 1] = 1.5
        for t in range(16):
            a0.c_attn.weight[TOK + t, cols(2, 0).start + t] = 1.0
            a0.c_proj.weight[0 * dh + t, PREV + t] = 0.16
        # L1H0: induction head
        a1 = body.h[1].attn
        for t in range(16):
            a1.c_attn.weight[TOK + t, cols(0, 0).start + t] = 2.0
            a1.c_attn.weight[PREV + t, cols(1, 0).start + t] = 2.0
            a1.c_attn.weight[TOK + t, cols(2, 0).start + t] = 1.0
            a1.c_proj.weight[0 * dh + t, OUT + t] = 0.2
        # distractors: random attention reading tokens and positions, writing junk only
        for attn in (a0, a1):
            for head in (1, 2, 3):
                for kind in (0, 1, 2):
                    attn.c_attn.weight[: JUNK, cols(kind, head)] = 0.3 * torch.randn(JUNK, dh, generator=gen)
                attn.c_proj.weight[head * dh:(head + 1) * dh, JUNK:] = 0.02 * torch.randn(dh, 16, generator=gen)
        model.lm_head.weight[:, OUT:OUT + 16] = 10.0 * torch.eye(16)
    model.config.architectures = ["GPT2LMHeadModel"]
    tokenizer = word_tokenizer(WORDS, name="probe/planted-induction")
    return wrap_hf_model(model, tokenizer, "planted-induction", hub_name="probe/planted-induction", device="cpu")


def induction_batch(model: LoadedModel, n: int = 12, length: int = 7, seed: int = 0) -> LogitDiffBatch:
    """"<bos> x1 … x7 xi" → x(i+1); foil = the repeated token itself. Reference: no repeat."""
    rng = random.Random(seed)
    texts, good, bad, refs = [], [], [], []
    vocab = model.tokenizer.get_vocab()
    for _ in range(n):
        seq = rng.sample(LETTERS, length)
        i = rng.randrange(length - 1)
        texts.append(" ".join(seq + [seq[i]]))
        good.append(vocab[seq[i + 1]])
        bad.append(vocab[seq[i]])
        refs.append(" ".join(rng.sample(LETTERS, length + 1)))
    ids = torch.cat([model.encode(t) for t in texts])
    ref_ids = torch.cat([model.encode(t) for t in refs])
    return LogitDiffBatch("planted-induction", ids, torch.tensor(good), torch.tensor(bad), ref_ids, texts)
