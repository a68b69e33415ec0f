"""What a retrieval-heads run is asked to do: its settings, presets, errors and prompt template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from analyses.data.haystack import NEEDLE_STRIDE
from probe.errors import ProbeError
from probe.models import LoadedModel

if TYPE_CHECKING:
    from analyses.retrieval.result import RetrievalResult

ANALYZER = "retrieval"
VERSION = "2"  # 2: held-out masking split, stemmed ROUGE-1 gate, random pool outside every head above threshold
SCORE_MODES = ("events", "unique")
MATCH_MODES = ("id", "text")
MASK_KINDS = ("uniform", "zero")


class RetrievalError(ProbeError):
    """A retrieval-heads run that cannot be carried out as configured."""


class InSampleError(RetrievalError):
    """The masking grid shares needles, depths or haystack text with the detection grid (not held out)."""


class NoRetrievalError(RetrievalError):
    """No sample passed the ROUGE gate: there is nothing to score. `.result` holds the ungated run."""

    def __init__(self, message: str, result: RetrievalResult | None = None) -> None:
        super().__init__(message)
        self.result = result



@dataclass(frozen=True)
class RetrievalConfig:
    """Every knob of a run. Lengths count haystack + needle tokens (the prompt adds the question)."""

    lengths: tuple[int, ...] = (512, 1024, 1536)
    depths: tuple[float, ...] = (0.0, 50.0, 100.0)
    needles: tuple[int, ...] = (0, 1, 2)
    template: str = "auto"  # auto (chat if the model has a chat template) | base | chat
    max_new_tokens: int = 24
    score_mode: str = "events"  # which score is the headline: events (authors' code) | unique (paper)
    match: str = "id"  # copy test: id (token ids equal) | text (decoded, whitespace-stripped strings equal)
    rouge_gate: bool = True
    rouge_threshold: float = 0.5
    rouge_stem: bool = True  # Porter-stem words before ROUGE-1, as the authors' rouge_score(use_stemmer=True)
    threshold: float = 0.1
    haystack_stride: int = NEEDLE_STRIDE  # needle i's haystack starts at sentence i * stride (mod the haystack)
    # masking experiment (skipped when mask_ks is empty); held out from detection by default (paper: heads
    # are selected on some needles and masked on another needle and haystack)
    mask_ks: tuple[int, ...] = ()
    mask_kinds: tuple[str, ...] = MASK_KINDS
    mask_random_draws: int = 3
    mask_needles: tuple[int, ...] = (3, 4, 5)
    mask_lengths: tuple[int, ...] | None = None  # None: the detection lengths
    mask_depths: tuple[float, ...] | None = None  # None: midpoints between consecutive detection depths
    mask_offset: int | None = None  # masking needle i reads from i * stride + mask_offset; None: stride // 2
    allow_in_sample: bool = False  # let the masking grid share needles/depths/haystack with detection (labelled)
    mask_batch: int = 16  # masking conditions decoded together per batch
    seed: int = 0

    def masking_depths(self) -> tuple[float, ...]:
        """The masking depths: the configured ones, else the midpoints between the detection depths
        (never a depth used for detection)."""
        if self.mask_depths is not None:
            return tuple(float(d) for d in self.mask_depths)
        ordered = sorted({float(d) for d in self.depths})
        if len(ordered) < 2:
            raise RetrievalError("Held-out masking depths are the midpoints between detection depths: give at "
                                 "least two detection depths, or mask_depths explicitly.")
        return tuple((a + b) / 2 for a, b in zip(ordered, ordered[1:]))

    def masking_offset(self) -> int:
        return self.haystack_stride // 2 if self.mask_offset is None else int(self.mask_offset)

    def validate(self) -> None:
        if self.score_mode not in SCORE_MODES:
            raise RetrievalError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}.")
        if self.match not in MATCH_MODES:
            raise RetrievalError(f"match must be one of {MATCH_MODES}, got {self.match!r}.")
        if self.template not in ("auto", "base", "chat"):
            raise RetrievalError(f"template must be auto, base or chat, got {self.template!r}.")
        bad = [k for k in self.mask_kinds if k not in MASK_KINDS]
        if bad:
            raise RetrievalError(f"Unknown mask kinds {bad}; choose from {MASK_KINDS}.")
        if any(k <= 0 for k in self.mask_ks):
            raise RetrievalError("mask_ks must be positive head counts.")
        if not self.lengths or not self.depths or not self.needles:
            raise RetrievalError("The grid needs at least one length, one depth and one needle.")
        if self.max_new_tokens < 1:
            raise RetrievalError("max_new_tokens must be at least 1.")
        if self.haystack_stride < 0:
            raise RetrievalError("haystack_stride must be >= 0.")
        if self.mask_ks and not self.mask_needles:
            raise RetrievalError("The masking experiment needs at least one needle (mask_needles).")


# quick preset (spec §8): 3 lengths <= 1,536 x 3 depths x 3 needles = 27 samples
QUICK = RetrievalConfig()
DEFAULT = RetrievalConfig(lengths=(512, 1024, 1536, 2048, 3072, 4096), depths=(0.0, 25.0, 50.0, 75.0, 100.0))


def resolve_template(model: LoadedModel, template: str) -> str:
    if template == "auto":
        return "chat" if model.chat_template else "base"
    if template == "chat" and not model.chat_template:
        raise RetrievalError(f"{model.spec} has no chat template; use template='base'.")
    return template
