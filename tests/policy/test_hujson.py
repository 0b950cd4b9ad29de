"""HuJSON: JSON plus comments and trailing commas; errors at line:column; bounded input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.errors import PolicyError
from agent.policy.hujson import parse


def test_comments_and_trailing_commas() -> None:
    text = """
    // a line comment
    {
      /* a block
         comment */ "acls": [1, 2, 3,], // after a value
      "nested": {"a": [], "b": {},},
      "s": "// not a comment /* nor this */",
    }
    // trailing comment"""
    doc = parse(text)
    assert doc.value == {
        "acls": [1, 2, 3],
        "nested": {"a": [], "b": {}},
        "s": "// not a comment /* nor this */",
    }


def test_plain_json_values() -> None:
    text = (
        '{"a": -1.5e3, "b": 0, "c": true, "d": false, "e": null, "f": "\\u00e9\\n\\ud83d\\ude00"}'
    )
    assert parse(text).value == json.loads(text)
    assert parse(b'["bytes", 1]').value == ["bytes", 1]
    assert parse("\ufeff[1]").value == [1]


def test_positions_of_values() -> None:
    doc = parse('{\n  "acls": [\n    {"src": ["a"]},\n  ],\n}')
    assert doc.position(()) == (1, 1)
    assert doc.position(("acls",)) == (2, 11)
    assert doc.position(("acls", 0, "src", 0)) == (3, 14)
    assert doc.position(("nope",)) is None


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("", "1:1", "empty document"),
        ("{,}", "1:2", "expected a string key"),
        ("[1,,2]", "1:4", "expected a value"),
        ("[,]", "1:2", "expected a value"),
        ('{\n  "a": 1\n  "b": 2\n}', "3:3", "expected ',' or '}'"),
        ('{"a" 1}', "1:6", "expected ':'"),
        ('{"a": 1, "a": 2}', "1:10", "duplicate key 'a'"),
        ("[1] [2]", "1:5", "after the top-level value"),
        ('"abc', "1:1", "unterminated string"),
        ('"a\tb"', "1:3", "invalid character in string"),
        ('"\\x"', "1:2", "invalid escape"),
        ('"\\ud800"', "1:1", "unpaired surrogate"),
        ("/* open", "1:1", "unterminated /* comment"),
        ("[1, /* open", "1:5", "unterminated /* comment"),
        ("01", "1:2", "after the top-level value"),
        ("-", "1:1", "invalid number"),
        ("[1.]", "1:3", "expected ',' or ']'"),
        ("[tru]", "1:2", "expected a value"),
        ("{1: 2}", "1:2", "expected a string key"),
        ("[1e999]", "1:2", "out of range"),
        ("[" + "1" * 100 + "]", "1:2", "number longer than"),
        ("# hash comments are not HuJSON", "1:1", "expected a value"),
    ],
)
def test_syntax_errors_name_line_and_column(text: str, where: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert str(info.value).startswith(f"{where}: ")
    assert message in str(info.value)
    line, column = (int(x) for x in where.split(":"))
    assert info.value.position == (line, column)


def test_limits() -> None:
    with pytest.raises(PolicyError, match="more than the limit"):
        parse("[" + " " * 100 + "]", max_size=50)
    with pytest.raises(PolicyError, match="nesting deeper than 64"):
        parse("[" * 65 + "]" * 65)
    assert parse("[" * 64 + "]" * 64).value is not None
    with pytest.raises(PolicyError, match="nesting deeper than 3"):
        parse('{"a": {"b": {"c": {}}}}', max_depth=3)
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse(b'["\xff"]')


def test_deep_hostile_input_is_an_error_not_a_recursion_error() -> None:
    with pytest.raises(PolicyError):
        parse("[" * 200_000)
    with pytest.raises(PolicyError):
        parse('{"a":' * 100_000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_parses_to_the_same_value(value: object) -> None:
    assert parse(json.dumps(value)).value == value
    assert parse(json.dumps(value, indent=2)).value == value


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='{}[],:"\\/*\n 1ae-.tfn', max_size=40))
def test_arbitrary_text_parses_or_raises_policy_error(text: str) -> None:
    try:
        parse(text)
    except PolicyError as e:
        error = e
    else:
        return
    assert error.position is not None
