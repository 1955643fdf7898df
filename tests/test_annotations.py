"""The annotation language: valid strings parse to the expected structure, bad ones say what is wrong."""

from __future__ import annotations

import re

import pytest

from dimshard.planner.ops.annotations import AnnotationError, parse_annotation


def test_chunked_cross_entropy_annotation():
    ann = parse_annotation("b l d^, n^ d^, b l -> b l")
    assert [str(s) for s in ann.inputs] == ["b l d", "n d", "b l"]
    assert ann.frozen == {"d", "n"}
    assert ann.reductions == {"d", "n"}
    assert ann.splittable() == ["b", "l"]
    assert str(ann) == "b l d^, n^ d^, b l -> b l"


def test_groups_broadcast_and_reduction():
    ann = parse_annotation("b l (h d), 1 l 1 -> b h l d")
    assert ann.inputs[0].dims[2].names == ("h", "d")
    assert ann.inputs[1].dims[0].is_broadcast
    ann = parse_annotation("m k, k n -> m n")
    assert ann.reductions == {"k"}
    assert ann.splittable() == ["m", "k", "n"]


def test_output_only_names_are_frozen():
    ann = parse_annotation("b 1 -> b x")
    assert "x" in ann.frozen and ann.splittable() == ["b"]


def test_scalar_output_and_no_inputs():
    assert parse_annotation("n c^, n -> ").outputs[0].dims == ()
    assert parse_annotation(" -> f^").inputs == ()


def test_ellipsis_binds_fresh_names_from_the_right():
    ann = parse_annotation("... k, n k -> ... n").bind([3, 2], [3])
    assert [str(s) for s in ann.inputs] == ["_e0 _e1 k", "n k"]
    assert str(ann.outputs[0]) == "_e0 _e1 n"
    ann = parse_annotation("... d, d -> ... d").bind([2, 1], [2])
    assert str(ann.inputs[0]) == "_e0 d"


def test_summands_are_marked_and_survive_binding():
    ann = parse_annotation("... k, n k, +n -> ... n")
    assert [s.summand for s in ann.inputs] == [False, False, True]
    assert ann.reductions == {"k"} and ann.splittable() == ["k", "n"]  # the summed dim may split
    assert str(ann) == "... k, n k, +n -> ... n"
    bound = ann.bind([3, 2, 1], [3])
    assert bound.inputs[2].summand and str(bound) == "_e0 _e1 k, n k, +n -> _e0 _e1 n"
    assert str(parse_annotation("+, m k, k n -> m n").inputs[0]) == "+"  # a 0-d summand
    assert str(parse_annotation("+b 1 n, b m k, b k n -> b m n")) == "+b 1 n, b m k, b k n -> b m n"


@pytest.mark.parametrize(
    "text,message",
    [
        ("m k, +k -> m", "has dim 'k', which no output has"),
        ("m k -> +m", "marks an output '+'"),
        ("b l d", "exactly one '->'"),
        ("b l -> b -> l", "exactly one '->'"),
        ("b (h d -> b h d", "unbalanced '('"),
        ("b h d) -> b h d", "unbalanced ')'"),
        ("b ((h d)) -> b", "nested '('"),
        ("b (h) -> b h", "at least two names"),
        ("b b -> b", "appears twice"),
        ("b ... ... -> b", "more than one '...'"),
        ("b 1^ -> b", "'1^'"),
        ("b l-x -> b", "bad dim name"),
    ],
)
def test_malformed_annotations_say_what_is_wrong(text, message):
    with pytest.raises(AnnotationError, match=re.escape(message)):
        parse_annotation(text)


def test_bind_rank_mismatch():
    with pytest.raises(AnnotationError, match="has 2 dims but the call's tensor has 3"):
        parse_annotation("a b -> a b").bind([3], [3])
    with pytest.raises(AnnotationError, match="names 1 input"):
        parse_annotation("a b -> a b").bind([2, 2], [2])
