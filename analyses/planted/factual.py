"""A planted factual-recall model: one head copies the context city, one head writes the memorised capital.

Hand-set weights, written through `probe.plant` (Llama by default: 2 layers x 4 heads, d_model 64,
RMSNorm, RoPE made negligible by a huge base; `family=` builds the same weights in GPT-2, GPT-NeoX,
Qwen3 or Gemma 3) over a word tokenizer that splits punctuation, so the counterfactual prompts of
`analyses.data.counterfactual` tokenize word by word:

- every token has a one-hot embedding;
- L1H0 (*in-context head*): its query is constant, its key is large on city tokens, so it attends
  to the context city; its OV circuit maps a city token to that city's unembedding (gain `copy_gain`);
- L1H1 (*memory head*): attends to the country tokens; its OV circuit maps a country to the
  unembedding of its capital (gain `memory_gain`);
- L0H2 and L1H2 write into unused residual dimensions (they change the final norm's scale but not
  the answer), the other heads and all MLPs are zero.

With copy_gain > memory_gain the model answers in context; scaling L1H0 below memory_gain/copy_gain
or L1H1 above copy_gain/memory_gain makes it answer from memory. The known answer for attribution:
L1H0 > 0, L1H1 < 0, every other head 0.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from probe import plant
from probe.heads import Head
from probe.models import LoadedModel

PLANTED_TABLE: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"),
)
TEMPLATE_WORDS = ("The", "capital", "of", "is", ".", "Q", ":", "What", "the", "?", "A")
SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>")
IN_CONTEXT_HEAD = Head(1, 0)
MEMORY_HEAD = Head(1, 1)


def planted_tokenizer(table: tuple[tuple[str, str], ...] = PLANTED_TABLE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that also splits punctuation ("London." -> "London", ".")."""
    words = list(SPECIALS) + list(TEMPLATE_WORDS) + [c for c, _ in table] + [city for _, city in table]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", add_bos_token=True,
                                   name_or_path="probe/factual-planted")


@torch.no_grad()
def planted_factual_model(copy_gain: float = 3.0, memory_gain: float = 2.0,
                          table: tuple[tuple[str, str], ...] = PLANTED_TABLE, device: str = "cpu",
                          family: str = "llama") -> LoadedModel:
    """The planted model wrapped as a `LoadedModel` (see the module docstring); `family`
    (probe.plant.FAMILIES) builds the same weights in another family (4 heads of d_head 16 = d_model / 4
    fit GPT-2 and GPT-NeoX too, whose partial rotary leaves the slow dimension unrotated)."""
    tokenizer = planted_tokenizer(table)
    vocab = tokenizer.get_vocab()
    V, d_model, n_heads, d_head = len(vocab), 64, 4, 16
    if V > 40:
        raise ValueError("The planted table is too large for d_model 64 (one-hot embeddings + spare dims).")
    shape = plant.Shape(V, d_model, 2, n_heads, n_heads, d_head, 32, 256, rope_theta=1e9,
                        bos=vocab["<bos>"], eos=vocab["<eos>"], pad=vocab["<pad>"])
    spec = "tiny-factual-planted" if family == "llama" else f"tiny-factual-planted-{family}"
    model = plant.new_model(family, shape, tokenizer, spec, hub_name="probe/tiny-factual-planted", device=device)
    plant.set_embedding(model, torch.eye(V, d_model), as_added=True)

    norm_gain = d_model ** 0.5  # RMSNorm of a one-hot vector: the 1 becomes sqrt(d_model)
    slow = d_head // 2 - 1      # the slowest-rotating RoPE dimension: rotation ~ position * 1e-8
    score = 40.0                # q.k / sqrt(d_head) on the attended tokens
    amplitude = (score * d_head ** 0.5) ** 0.5 / norm_gain
    cities = [vocab[city] for _, city in table]
    countries = [vocab[country] for country, _ in table]
    unembed = torch.zeros(V, d_model)
    unembed[cities, cities] = 1.0  # only cities have a logit: the answer is a city
    plant.set_unembedding(model, unembed)

    def plant_head(head: int, keys: list[int], targets: list[int], gain: float) -> None:
        W_Q, W_K = torch.zeros(d_model, d_head), torch.zeros(d_model, d_head)
        W_V, W_O = torch.zeros(d_model, d_head), torch.zeros(d_head, d_model)
        W_Q[:V, slow] = amplitude              # constant query
        W_K[keys, slow] = amplitude            # keys only on these tokens
        for slot, (source, target) in enumerate(zip(keys, targets)):
            W_V[source, slot] = 1.0 / norm_gain    # value: one slot per source token
            W_O[slot, target] = gain               # output: the target's unembedding
        plant.set_head_qk(model, 1, head, W_Q, W_K)
        plant.set_head_ov(model, 1, head, W_V, W_O)

    plant_head(IN_CONTEXT_HEAD.head, cities, cities, copy_gain)
    plant_head(MEMORY_HEAD.head, countries, cities, memory_gain)
    # Distractors: write into spare dimensions (changes the norm scale, not the answer).
    generator = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        W_V = torch.zeros(d_model, d_head)
        W_V[:V] = torch.randn(d_head, V, generator=generator).T / norm_gain
        W_O = torch.zeros(d_head, d_model)
        W_O[:, V + 4:] = (torch.randn(d_model - V - 4, d_head, generator=generator) * 0.05).T
        plant.set_head_ov(model, layer, 2, W_V, W_O)
    return model


def factual_model(copy_gain: float = 3.0, memory_gain: float = 2.0, family: str = "llama") -> LoadedModel:
    """Planted factual-recall model (`planted_factual_model`): `IN_CONTEXT_HEAD` (L1H0) copies the
    context city, `MEMORY_HEAD` (L1H1) writes the memorised capital of `PLANTED_TABLE`.
    With copy_gain > memory_gain the model answers in context; attribution: L1H0 > 0, L1H1 < 0."""
    return planted_factual_model(copy_gain=copy_gain, memory_gain=memory_gain, family=family)
