"""``peftkit.core.typecheck``: a value against an annotation, as configs from Python, JSON and YAML need."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftkit.core.typecheck import describe, fits


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3, int, (True, 3)),
        (True, int, (False, True)),  # a bool is not a count
        (3, float, (True, 3.0)),
        ("3", int, (False, "3")),
        (None, int | None, (True, None)),
        (["q", "v"], list[str], (True, ["q", "v"])),
        (["q", 5], list[str], (False, ["q", 5])),
        ("q", list[str] | str, (True, "q")),
        ({"a": 2}, dict[str, int], (True, {"a": 2})),
        ([1], dict[str, int], (False, [1])),
        ("GAUSSIAN", Literal["gaussian", "pissa"], (True, "gaussian")),  # HF PEFT compares these loosely
        ("x", Any, (True, "x")),
    ],
)
def test_values_against_annotations(value: Any, annotation: Any, expected: tuple[bool, Any]) -> None:
    ok, converted = fits(value, annotation)
    assert (ok, converted) == expected
    if ok:
        assert type(converted) is type(expected[1])


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_field_takes_exactly_the_finite_floats(value: float) -> None:
    assert fits(value, float)[0] is math.isfinite(value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_written_as_text_only_when_asked(value: float) -> None:
    assert fits(repr(value), float, text_numbers=True) == (True, value)
    assert fits(repr(value), float)[0] is False


def test_annotations_in_words() -> None:
    assert describe(int | None) == "int or null"
    assert "list" in describe(list[str])
