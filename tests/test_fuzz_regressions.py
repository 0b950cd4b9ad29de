"""Inputs the fuzzers (fuzz/) found that escaped the config and control API error contracts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api import ApiError, Request, Response, Status
from agent.config import ConfigError, parse_config

DEEP = "[" * 5000  # deeper than Python's recursion limit: the parsers raised RecursionError


@pytest.mark.parametrize("parse", [Request.parse, Response.parse, Status.from_json])
def test_deeply_nested_control_line_is_an_api_error(parse: object) -> None:
    with pytest.raises(ApiError):
        parse(DEEP)  # type: ignore[operator]


@pytest.mark.parametrize("text", ["a = " + DEEP, "a = " + "{b = " * 3000])
def test_deeply_nested_toml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(text)


def test_toml_integer_past_the_digit_limit_is_a_config_error() -> None:
    # tomllib raised a plain ValueError (int() refuses more than 4300 digits)
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("a = " + "9" * 5000)


def test_a_key_file_that_never_ends_is_refused_not_read_forever(tmp_path: Path) -> None:

    text = '[interface]\nprivate_key_file = "/dev/zero"\naddresses = ["100.64.0.1/32"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path)
    assert "interface.private_key_file" in str(info.value.problems)
