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

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(notebook(cells), HERE / name)
        print("wrote", HERE / name)
