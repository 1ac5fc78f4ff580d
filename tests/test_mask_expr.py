import re

import pytest
import torch

from maskattn import masks
from maskattn.masks.expr import MaskSyntaxError, parse


@pytest.mark.parametrize(
    "text,expected",
    [
        ("causal", masks.causal()),
        ("causal & window(4)", masks.causal() & masks.sliding_window(4)),
        ("causal | ~padding(5)", masks.causal() | ~masks.padding([5])),
        ("~(causal & prefix(3))", ~(masks.causal() & masks.prefix_lm(3))),
        ("full & ~ ~causal", masks.full() & ~~masks.causal()),
        ("causal & window(3) | padding(2)", (masks.causal() & masks.sliding_window(3)) | masks.padding([2])),
        ("document(3, 5) & causal", masks.document(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])) & masks.causal()),
    ],
)
def test_parse_matches_the_python_expression(text, expected):
    got = parse(text)
    assert torch.equal(got.to_dense(8, 8), expected.to_dense(8, 8))


@pytest.mark.parametrize(
    "text,position,words",
    [
        ("causal & windo(4)", 9, "unknown mask 'windo'"),
        ("causal && window(4)", 8, "expected a mask name"),
        ("causal & window(4", 17, "expected ')'"),
        ("causal & window()", 9, "window takes 1 argument(s), got 0"),
        ("causal & window(0)", 9, "size must be in [1, 2**62]"),
        ("causal $ full", 7, "unexpected character '$'"),
        ("causal full", 7, "unexpected 'full'"),
        ("window", 0, "window takes 1 argument"),
        # one id per position: 10**11 of them were allocated (or a raw RuntimeError)
        ("causal & document(100000000000)", 9, "document() covers 100000000000 positions in all; at most 2**24"),
        # were "found ''" and "unexpected character '-'"
        ("causal & window(", 16, "expected an integer argument of window(), found the end"),
        ("window(-1)", 7, "window(): a negative argument -1; arguments are integers >= 0"),
        ("padding(3, -2)", 11, "padding(): a negative argument -2; arguments are integers >= 0"),
        ("window(4,)", 9, "expected an integer argument of window(), found ')'"),  # a trailing comma
        ("document(16777216, 1)", 0, "document() covers 16777217 positions in all; at most 2**24"),  # one past
    ],
)
def test_errors_point_at_the_token(text, position, words):
    with pytest.raises(MaskSyntaxError, match=re.escape(words)) as info:
        parse(text)
    assert info.value.position == position
    assert str(info.value).endswith("\n  " + " " * position + "^")


def test_empty_parentheses_are_a_call_without_arguments():
    # `causal()`, as the Python API spells it, said "expected an integer argument of causal(), found ')'"
    for text, expected in (("causal()", masks.causal()), ("full() & window(2)", masks.full() & masks.sliding_window(2)),
                           ("~causal( ) | prefix(1)", ~masks.causal() | masks.prefix_lm(1))):
        assert torch.equal(parse(text).to_dense(6, 6), expected.to_dense(6, 6)), text
    with pytest.raises(MaskSyntaxError, match=re.escape("window takes 1 argument(s), got 0 at position 0")):
        parse("window()")
    with pytest.raises(MaskSyntaxError, match=re.escape("padding takes at least one argument, got 0")):
        parse("padding()")


def test_parenthesised_terms_side_by_side_are_not_nesting():
    # the depth limit is for nesting: 150 parenthesised terms joined by & are 1 deep
    text = " & ".join(["(causal)"] * 150)
    assert torch.equal(parse(text).to_dense(5, 5), masks.causal().to_dense(5, 5))
    with pytest.raises(MaskSyntaxError, match="more than 100 deep"):
        parse("(" * 101 + "causal" + ")" * 101)

