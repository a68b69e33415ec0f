"""`probe doctor MODEL`: does probe read this model right? The proof matrix's checks, at a reduced size.

For any spec (embedded, `hf:<folder or hub id>`, `gguf:<file>`, the tiny and registered specs) it says
which bridge adapter and family facts the architecture layer found, then runs each check of the
architecture matrix (tests/families/test_architectures_*.py) once on the model itself:

| # | check         | compares                                                                         |
|---|---------------|----------------------------------------------------------------------------------|
| 1 | logits        | the bridge's logits vs an independently loaded Hugging Face copy (fp32, eager)   |
| 2 | left-pad      | a left-padded batch's last-position logits vs each row alone (masked forward)    |
| 3 | left-pad gen  | `probe.generation.greedy_generate` on the batch vs each row alone (ids)           |
| 4 | zero-head     | zero-ablating each query head of one layer (probe's hook_z intervention) vs      |
|   |               | zeroing that head's slice of the copy's output-projection input                  |
| 5 | successor e(t)| e(t) from the layer vs the model's own block 0 on the token alone (hooks)         |
| 6 | successor OV  | each head's OV logits of one layer vs the model's own attention on e(t)          |
| 7 | retrieval     | the cached fast path's argmax keys and answer vs the full-forward reference      |
| 8 | Ships         | the batched query-level Ships vs one forward per ablated head                    |
| 9 | factual DLA   | all-heads direct logit attribution vs removing each head's direct path           |

The copy is loaded again from the same files (embedded GGUF assets, `hf:`, `gguf:`); specs without
files (tiny, registered organisms) get a fresh Hugging Face module tree holding a copy of the loaded
weights (the bridge rewires the wrapped model in place; the fresh tree is not rewired). A family the
architecture layer does not cover is reported as unsupported, naming the missing component.

The package: context (the independent copy, sizes, shared helpers), checks (one function per row,
tolerances, names), report (the result and its table, header and timing lines), run (`doctor`).
"""

from analyses.doctor.checks import CHECKS
from analyses.doctor.context import DoctorError, DoctorSize
from analyses.doctor.report import DOCTOR_COLUMNS, Check, DoctorResult, header_lines, table_rows, timing_line
from analyses.doctor.run import doctor

__all__ = ["doctor", "DoctorSize", "DoctorResult", "DoctorError", "Check", "CHECKS", "DOCTOR_COLUMNS",
           "header_lines", "table_rows", "timing_line"]
