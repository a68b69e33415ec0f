"""Invented facts ("needles") for needle-in-a-haystack retrieval tests.

Written by the project. Every person, place and custom below is made up, so
a model can only answer the question by reading the fact from its context.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Needle:
    """An invented fact, a question about it, and its verbatim answer.

    ``answer`` is an 8-20 word phrase that appears verbatim inside ``fact``.
    """

    fact: str
    question: str
    answer: str


# Written by the project.
NEEDLES: tuple[Needle, ...] = (
    Needle(
        fact=(
            "The secret ingredient in Grandma Odile's lighthouse soup is three "
            "spoons of smoked paprika and a handful of wild sorrel."
        ),
        question="What is the secret ingredient in Grandma Odile's lighthouse soup?",
        answer="three spoons of smoked paprika and a handful of wild sorrel",
    ),
    Needle(
        fact=(
            "The best way to spend a rainy afternoon in the village of Quillbrook "
            "is to rent a canoe from Marta Fenwhistle and paddle to the floating "
            "library."
        ),
        question=(
            "What is the best way to spend a rainy afternoon in the village of "
            "Quillbrook?"
        ),
        answer=(
            "rent a canoe from Marta Fenwhistle and paddle to the floating library"
        ),
    ),
    Needle(
        fact=(
            "To be let into Professor Ilvane Dusk's observatory, a visitor must "
            "whisper the name of a forgotten comet while holding a brass compass."
        ),
        question="What must a visitor do to be let into Professor Ilvane Dusk's observatory?",
        answer="whisper the name of a forgotten comet while holding a brass compass",
    ),
    Needle(
        fact=(
            "Every spring, the fishermen of Tarrow Cove celebrate the first catch "
            "by painting their boat hulls bright orange and singing to the tide at "
            "dawn."
        ),
        question="How do the fishermen of Tarrow Cove celebrate the first catch each spring?",
        answer=(
            "painting their boat hulls bright orange and singing to the tide at dawn"
        ),
    ),
    Needle(
        fact=(
            "According to the gardeners of Ashbury Hollow, the only way to grow "
            "blue tomatoes is to water them with cold chamomile tea every third "
            "evening."
        ),
        question=(
            "According to the gardeners of Ashbury Hollow, what is the only way to "
            "grow blue tomatoes?"
        ),
        answer="water them with cold chamomile tea every third evening",
    ),
    Needle(
        fact=(
            "The lucky charm that the jazz pianist Ottilie Brannagh keeps on her "
            "piano is a tiny ceramic owl painted with green and gold stripes."
        ),
        question="What lucky charm does the jazz pianist Ottilie Brannagh keep on her piano?",
        answer="a tiny ceramic owl painted with green and gold stripes",
    ),
)
