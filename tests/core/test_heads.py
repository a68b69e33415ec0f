from types import SimpleNamespace

import pytest

from probe.errors import HeadError
from probe.heads import Head, format_heads, parse_heads, validate_heads

SHAPE = SimpleNamespace(spec="toy", n_layers=30, n_heads=9, n_kv_heads=3)


def test_parse_and_format_round_trip():
    assert Head.parse("L5H3") == Head(5, 3)
    assert Head.parse("5.3") == Head(5, 3)
    assert Head.parse("l12h0") == Head(12, 0)
    assert str(Head(5, 3)) == "L5H3"
    heads = parse_heads("L5H3, 2.1 L5H3")
    assert heads == [Head(5, 3), Head(2, 1)]  # order kept, duplicates dropped
    assert parse_heads(format_heads(heads)) == heads


def test_wildcard_expands_against_the_model():
    heads = parse_heads("L2H*", SHAPE)
    assert heads == [Head(2, h) for h in range(9)]
    with pytest.raises(HeadError, match="needs a model"):
        parse_heads("L2H*")


@pytest.mark.parametrize("bad", ["L40H2", "L2H9", "31.0"])
def test_out_of_range_names_the_shape(bad):
    with pytest.raises(HeadError, match=r"30 layers \(0-29\) x 9 query heads"):
        parse_heads(bad, SHAPE)


@pytest.mark.parametrize("bad", ["H3", "L5", "5-3", "L5H3H1", ""])
def test_unreadable_heads(bad):
    with pytest.raises(HeadError):
        Head.parse(bad)


def test_validate_accepts_corners():
    validate_heads([Head(0, 0), Head(29, 8)], SHAPE)
