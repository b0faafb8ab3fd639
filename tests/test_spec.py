"""The spec language: parsing, formatting, errors, and a fuzz of both."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_accel.errors import AccelError, SpecSyntaxError
from hf_accel.spec import format_spec, parse_spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int8", [("int8", {})]),
        ("int8+sink(window=1024, sinks=4)", [("int8", {}), ("sink", {"window": 1024, "sinks": 4})]),
        (" a ( x = -1.5e3 , y = true , z = none ) ", [("a", {"x": -1500.0, "y": True, "z": None})]),
        ("a(l=[1, 'two', [3]], w=lm_head, q=\"a b\")", [("a", {"l": [1, "two", [3]], "w": "lm_head", "q": "a b"})]),
        ("a()+b", [("a", {}), ("b", {})]),
    ],
)
def test_parse(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    "text, pos",
    [("", 0), ("int8+", 5), ("a(b)", 3), ("a(b=1", 5), ("a(b=1,b=2)", 7), ("9a", 0), ("a b", 2), ("a(b='x)", 4)],
)
def test_malformed_specs_point_at_the_error(text, pos):
    with pytest.raises(SpecSyntaxError) as e:
        parse_spec(text)
    assert e.value.pos == pos
    assert "accepted form" in str(e.value)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
scalars = st.one_of(
    st.integers(-10**9, 10**9),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.none(),
    st.text(st.characters(blacklist_characters="'\"", blacklist_categories=("Cs",)), max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
specs = st.lists(st.tuples(names, st.dictionaries(names, values, max_size=3)), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(specs)
def test_format_then_parse_round_trips(items):
    assert parse_spec(format_spec(items)) == items


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_parser_never_fails_with_anything_but_a_spec_error(text):
    try:
        parse_spec(text)
    except AccelError:
        pass
