"""Factual-recall heads on every family of tests/support/families.py, loaded the user's way (`hf:<folder>`).

tests/families/test_architectures_analyzers.py already holds the factual cell "DLA == direct-path patching"; this file
adds the two other steps of the analysis, each against the model's own modules:

- head attribution adds up: per layer, the sum of the heads' DLA == that layer's attention output as
  the model adds it to the residual (`hook_attn_out`, minus the shared output bias; through the
  post-attention norm with its scale frozen where the family has one), read out through the final norm
  with the scale recomputed from the final residual (`probe.readout.final_scale`), not the cached one;
- the steering step: value-scaling a last-layer head by s (`analyses.factual.behaviour.fast_rates` under
  `probe.interventions.scale`, the path the scaling search and the held-out report use) == the last
  block recomputed by hand through the architecture layer (attention output + (s - 1) × the head's
  output, the post-attention norm where there is one, the layer's MLP block on that, the final norm and
  unembedding of `probe.readout`, soft-cap included); then the search and the causal checks run on
  disjoint tuning / held-out "countries".

Cells go to the proof matrix (tests/support/matrix.py): "factual DLA sum", "factual steering".
"""

from __future__ import annotations


import pytest
import torch
from matrix import record

from analyses import factual as F
from analyses.factual.behaviour import fast_rates
from analyses.factual.causal import causal_checks
from analyses.factual.steering import best_point
from probe import readout
from probe.architecture import architecture
from probe.heads import Head
from probe.interventions import scale

ATOL = 1e-4
FACTORS = (-1.0, 2.0)
# Word-tokenizer prompts: (country, context city, true capital); random weights know nothing, so any
# two distinct vocabulary words serve as the two answers.
TUNING = (("mary", "key", "book"), ("john", "park", "store"))
HELDOUT = (("city", "book", "key"), ("country", "store", "park"))




def _prompts(model, rows) -> list[F.CounterfactualPrompt]:
    vocab = model.tokenizer.get_vocab()
    return [F.CounterfactualPrompt(country, (capital,), context, f"the capital of {country} is the {context} . q : what",
                                   vocab[capital], vocab[context], False) for country, context, capital in rows]


def test_head_attribution_adds_up_to_each_attention_layers_direct_contribution(family):
    name, model = family
    arch = architecture(model)
    prompts = _prompts(model, TUNING)
    attribution = F.head_attribution(model, prompts)
    L = model.n_layers
    names = {f"blocks.{l}.hook_attn_out" for l in range(L)} | {f"blocks.{L - 1}.hook_resid_post"}
    names |= {f"blocks.{l}.ln1_post.hook_scale" for l in range(L) if arch.norm("ln1_post", l) is not None}
    worst, largest = 0.0, 0.0
    for index, prompt in enumerate(prompts):
        _, cache = model.run_with_cache(model.encode(prompt.text), names_filter=lambda n: n in names)
        scale_final = readout.final_scale(model, cache[f"blocks.{L - 1}.hook_resid_post"][0, -1].double())
        columns = arch.W_U_columns([prompt.in_context_token, prompt.memorised_token]).double()
        for layer in range(L):
            contribution = cache[f"blocks.{layer}.hook_attn_out"][0, -1].double()
            bias = arch.b_O[layer].double() if arch.b_O is not None else torch.zeros_like(contribution)
            post = arch.norm("ln1_post", layer)
            if post is not None:  # attn_out = (heads + b_O) / s * g with the clean s: remove b_O's share
                s = cache[f"blocks.{layer}.ln1_post.hook_scale"][0, -1].double()
                bias = bias / s * post.weight.double()
            pair = readout.frozen_final_norm(model, contribution - bias, scale_final) @ columns
            direct = float(pair[0] - pair[1])
            heads = float(attribution.per_prompt[index, layer].sum())
            worst = max(worst, abs(direct - heads))
            largest = max(largest, abs(direct))
    assert largest > 1e-2  # the layers write something along the answer direction
    assert record(name, "factual DLA sum", worst) <= ATOL


def _last_block_prediction(model, prompt: F.CounterfactualPrompt, factors) -> torch.Tensor:
    """`[H, len(factors)]` d = logit(in-context) - logit(memorised) with last-layer head h's z scaled by
    s, recomputed from the clean run: only the last block's attention output changes, by (s - 1) z_h W_O[h]
    (inside the post-attention norm where there is one; its scale is recomputed, not frozen), and the
    block's MLP sees the new sum."""
    arch = architecture(model)
    layer = model.n_layers - 1
    post = arch.norm("ln1_post", layer)
    names = {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"}
    if post is not None:
        names.add(f"blocks.{layer}.ln1_post.hook_in")
    _, cache = model.run_with_cache(model.encode(prompt.text), names_filter=lambda n: n in names)
    x = cache[f"blocks.{layer}.hook_resid_pre"][0, -1:].float()
    z = cache[f"blocks.{layer}.attn.hook_z"][0, -1].float()                      # [H, d_head]
    out = torch.zeros(model.n_heads, len(factors))
    with torch.no_grad(), model.lock:
        for head in range(model.n_heads):
            r = z[head] @ arch.W_O[layer, head].float()
            for k, s in enumerate(factors):
                if post is None:
                    attn = cache[f"blocks.{layer}.hook_attn_out"][0, -1:].float() + (s - 1.0) * r
                else:
                    attn = post(cache[f"blocks.{layer}.ln1_post.hook_in"][0, -1:] + (s - 1.0) * r).float()
                resid = x + attn + arch.mlp_block_output(layer, x, attn)
                logits = readout.logits_from_normalized(model, readout.apply_final_norm(model, resid),
                                                        [prompt.in_context_token, prompt.memorised_token])
                out[head, k] = logits[0, 0] - logits[0, 1]
    return out


def test_scaling_a_head_moves_the_measure_by_what_the_last_block_says(family):
    name, model = family
    prompts = _prompts(model, TUNING)
    layer = model.n_layers - 1
    expected = torch.stack([_last_block_prediction(model, p, FACTORS) for p in prompts]).mean(0)  # [H, factors]
    base = fast_rates(model, prompts).mean_logit_diff  # both prompts in one batch (same length)
    worst, moved = 0.0, 0.0
    for head in range(model.n_heads):
        for k, s in enumerate(FACTORS):
            got = fast_rates(model, prompts, scale([Head(layer, head)], "value", s)).mean_logit_diff
            worst = max(worst, abs(got - float(expected[head, k])))
            moved = max(moved, abs(got - base))
    assert moved > 1e-2  # the scaling changes the measure (a hook can fire and change nothing)
    assert record(name, "factual steering", worst) <= ATOL


def test_scaling_search_and_held_out_causal_checks_run(family):
    """The search picks a (head, factor) on the tuning prompts; the held-out checks run on other
    countries, and refuse the tuning ones."""
    name, model = family
    tuning, heldout = _prompts(model, TUNING), _prompts(model, HELDOUT)
    scores = F.head_attribution(model, tuning).mean
    flat = scores.flatten()
    top_ic = [Head(int(i) // model.n_heads, int(i) % model.n_heads) for i in torch.argsort(flat, descending=True)[:1]]
    top_mem = [Head(int(i) // model.n_heads, int(i) % model.n_heads) for i in torch.argsort(flat)[:1]]
    sweep = F.scale_sweep(model, tuning, top_ic + top_mem, (0.0, 2.0))
    assert len(sweep) == 4 and len({p.fast.mean_logit_diff for p in sweep}) > 1
    config = F.FactualConfig(random_draws=2, ablate_top_k=1)
    best = {}
    for direction in ("in_context", "memorised"):
        point = best_point(sweep, direction)
        best[direction] = {"head": point.head, "factor": point.factor, "heldout_fast": fast_rates(
            model, heldout, scale([Head.parse(point.head)], "value", point.factor)).to_json()}
    baseline = fast_rates(model, heldout)
    out = causal_checks(model, heldout, top_ic, top_mem, best, config, baseline, tuning=tuning)
    assert out["n_heldout_countries"] == 2 and len(out["ablate_memory_heads"]["random_shifts"]) == 2
    with pytest.raises(F.SplitOverlapError):
        causal_checks(model, heldout + tuning[:1], top_ic, top_mem, best, config, baseline, tuning=tuning)
