"""HuJSON ("human JSON"): JSON plus `//` and `/* */` comments and trailing commas.

This is the format of Tailscale policy files. The parser is a bounded recursive descent over a
`str`: input longer than `max_size` or nested deeper than `max_depth` is refused before any
work is done on it, so hostile text can only ever produce a `PolicyError` (never a
`RecursionError`, a huge integer or a crash).

Besides the Python value (dict / list / str / int / float / bool / None), `parse()` returns the
offset of every value by its path (`("acls", 2, "dst", 0)`), so later semantic errors can say
where in the file the offending value is. Duplicate object keys are refused: a policy where the
second `"acls"` silently wins is a policy nobody reviewed.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import TypeAlias

from agent.policy.errors import PathItem, PolicyError, Position

__all__ = ["Document", "JSONValue", "MAX_DEPTH", "MAX_SIZE", "parse"]

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"

MAX_SIZE = 1 << 20  # characters (or bytes, for bytes input): far above any real policy
MAX_DEPTH = 64  # nesting of arrays and objects
_MAX_NUMBER_LEN = 64  # characters in one number literal (no 10,000-digit integers)

_WS = re.compile(r"[ \t\r\n]+")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"', re.DOTALL)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS: dict[str, bool | None] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed HuJSON text: its value and where each value (by path) starts."""

    value: JSONValue
    text: str = field(repr=False)
    offsets: dict[tuple[PathItem, ...], int] = field(repr=False)
    _line_starts: list[int] = field(repr=False, compare=False)

    def position(self, path: tuple[PathItem, ...]) -> Position | None:
        """1-based (line, column) of the value at `path`, or None if no such value."""
        offset = self.offsets.get(path)
        return None if offset is None else _position(self._line_starts, offset)


def parse(source: str | bytes, *, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH) -> Document:
    """Parse HuJSON text into a `Document`; raise `PolicyError` with `line:column` if invalid."""
    if len(source) > max_size:
        raise PolicyError(f"policy is {len(source)} bytes, more than the limit of {max_size}")
    if isinstance(source, bytes):
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError(f"not UTF-8 (byte {e.start})") from None
    else:
        text = source
    if text.startswith("\ufeff"):
        text = " " + text[1:]  # a byte-order mark is tolerated; keep the columns right
    parser = _Parser(text, max_depth)
    value = parser.document()
    return Document(value, text, parser.offsets, parser.line_starts)


def _line_starts(text: str) -> list[int]:
    return [0, *(m.end() for m in re.finditer("\n", text))]


def _position(line_starts: list[int], offset: int) -> Position:
    line = bisect.bisect_right(line_starts, offset)
    return line, offset - line_starts[line - 1] + 1


class _Parser:
    """One pass over `text`; `pos` only moves forward."""

    def __init__(self, text: str, max_depth: int) -> None:
        self.text = text
        self.pos = 0
        self.max_depth = max_depth
        self.offsets: dict[tuple[PathItem, ...], int] = {}
        self.line_starts = _line_starts(text)

    # -- errors and trivia ----------------------------------------------------------------

    def error(self, message: str, offset: int | None = None) -> PolicyError:
        at = self.pos if offset is None else offset
        return PolicyError(message, position=_position(self.line_starts, at))

    def _describe_here(self) -> str:
        if self.pos >= len(self.text):
            return "end of input"
        return f"character {self.text[self.pos]!r}"

    def skip(self) -> None:
        """Skip whitespace and comments."""
        text = self.text
        while True:
            m = _WS.match(text, self.pos)
            if m:
                self.pos = m.end()
            if text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end + 1
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("unterminated /* comment")
                self.pos = end + 2
            else:
                return

    # -- grammar --------------------------------------------------------------------------

    def document(self) -> JSONValue:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("empty document: expected a value")
        value = self.value((), 0)
        self.skip()
        if self.pos < len(self.text):
            raise self.error(f"unexpected {self._describe_here()} after the top-level value")
        return value

    def value(self, path: tuple[PathItem, ...], depth: int) -> JSONValue:
        self.offsets[path] = self.pos
        text = self.text
        c = text[self.pos] if self.pos < len(text) else ""
        if c == "{":
            return self.object(path, depth + 1)
        if c == "[":
            return self.array(path, depth + 1)
        if c == '"':
            return self.string()
        if c == "-" or c.isdigit():
            return self.number()
        for word, literal in _LITERALS.items():
            if text.startswith(word, self.pos):
                self.pos += len(word)
                return literal
        raise self.error(f"unexpected {self._describe_here()}: expected a value")

    def _enter(self, depth: int) -> None:
        if depth > self.max_depth:
            raise self.error(f"nesting deeper than {self.max_depth} levels")
        self.pos += 1  # the opening bracket

    def object(self, path: tuple[PathItem, ...], depth: int) -> dict[str, JSONValue]:
        self._enter(depth)
        out: dict[str, JSONValue] = {}
        while True:
            self.skip()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return out
            if not self.text.startswith('"', self.pos):
                found = self._describe_here()
                raise self.error(f"unexpected {found}: expected a string key or '}}'")
            key_at = self.pos
            key = self.string()
            if key in out:
                raise self.error(f"duplicate key {key!r}", key_at)
            self.skip()
            if not self.text.startswith(":", self.pos):
                raise self.error(f"unexpected {self._describe_here()}: expected ':' after key")
            self.pos += 1
            self.skip()
            out[key] = self.value((*path, key), depth)
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("}", self.pos):
                raise self.error(f"unexpected {self._describe_here()}: expected ',' or '}}'")

    def array(self, path: tuple[PathItem, ...], depth: int) -> list[JSONValue]:
        self._enter(depth)
        out: list[JSONValue] = []
        while True:
            self.skip()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            out.append(self.value((*path, len(out)), depth))
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("]", self.pos):
                raise self.error(f"unexpected {self._describe_here()}: expected ',' or ']'")

    def string(self) -> str:
        start = self.pos
        m = _STRING.match(self.text, start)
        if not m:
            raise self._string_error(start)
        raw = m.group()
        self.pos = m.end()
        if "\\" not in raw:
            return raw[1:-1]
        try:
            decoded: str = json.loads(raw)
        except json.JSONDecodeError as e:
            raise self.error(f"invalid escape in string: {e.msg}", start + e.pos) from None
        if any("\ud800" <= ch <= "\udfff" for ch in decoded):
            raise self.error("invalid \\u escape: unpaired surrogate", start)
        return decoded

    def _string_error(self, start: int) -> PolicyError:
        """Why the string starting at `start` did not match: where it breaks."""
        text, i = self.text, start + 1
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "\n":
                break
            if ch < " ":
                return self.error("invalid character in string", i)
            i += 1
        return self.error("unterminated string", start)

    def number(self) -> int | float:
        start = self.pos
        m = _NUMBER.match(self.text, start)
        if not m or m.end() == start:
            raise self.error("invalid number", start)
        literal = m.group()
        if len(literal) > _MAX_NUMBER_LEN:
            raise self.error(f"number longer than {_MAX_NUMBER_LEN} characters", start)
        self.pos = m.end()
        if m.group(1) is None and m.group(2) is None:
            return int(literal)
        number = float(literal)
        if number in (float("inf"), float("-inf")):
            raise self.error("number out of range", start)
        return number
