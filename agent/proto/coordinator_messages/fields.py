"""Limits, the `BadMessage` error and the JSON field readers every coordinator message uses.

Each reader takes the decoded object, the key and the path of the object inside the message, and
raises `BadMessage` naming `path.key` when the field is missing, mistyped or out of range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from agent.keys import DiscoPublic, KeyError_, NodePublic
from agent.proto.endpoint import parse_endpoint
from agent.proto.errors import MalformedPacket

__all__ = [
    "API",
    "LONG_POLL",
    "MAX_BODY",
    "MAX_ENDPOINTS",
    "MAX_HOSTNAME",
    "MAX_REGION",
    "Endpoint",
    "BadMessage",
    "load_object",
    "dump_object",
    "read_field",
    "read_opt_int",
    "read_number",
    "read_opt_number",
    "read_str",
    "read_node_key",
    "read_disco_key",
    "read_region",
    "read_endpoints",
    "read_ip",
]

API: Final = "/api/v1"
LONG_POLL: Final = 25.0  # a netmap request with nothing new is answered after this many seconds
MAX_BODY: Final = 64 << 10  # a request body; netmaps (responses) may be larger
MAX_ENDPOINTS: Final = 32
MAX_HOSTNAME: Final = 63
MAX_REGION: Final = 2**31 - 1

Endpoint = tuple[str, int]  # literal IP (no brackets), port: as agent.config.PeerConfig.endpoint


class BadMessage(MalformedPacket):
    """A coordinator message is not valid JSON of the expected shape; the text names the field."""


def load_object(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # Recursion: nested too deep
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("expected a JSON object")
    return doc


def dump_object(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def read_field(
    doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str = ""
) -> Any:
    where = f"{path}.{key}" if path else key
    if key not in doc:
        raise BadMessage(f"{where}: missing")
    v = doc[key]
    if isinstance(v, bool) and kind in (int, float, (int, float)):
        raise BadMessage(f"{where}: expected a number, got a boolean")
    if not isinstance(v, kind):
        raise BadMessage(f"{where}: expected {_kind_name(kind)}, got {type(v).__name__}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def read_opt_int(doc: Mapping[str, Any], key: str, path: str = "") -> int | None:
    if doc.get(key) is None:
        return None
    v: int = read_field(doc, key, int, path)
    return v


def read_number(doc: Mapping[str, Any], key: str, path: str = "") -> float:
    v = read_field(doc, key, (int, float), path)
    try:
        number = float(v)
    except OverflowError:  # an integer literal beyond a float
        number = math.inf
    if not math.isfinite(number):  # NaN passed every comparison (and SQLite stores it as NULL)
        raise BadMessage(f"{path + '.' if path else ''}{key}: not a finite number")
    return number


def read_opt_number(doc: Mapping[str, Any], key: str, path: str = "") -> float | None:
    return None if doc.get(key) is None else read_number(doc, key, path)


def read_str(doc: Mapping[str, Any], key: str, path: str = "") -> str:
    v: str = read_field(doc, key, str, path)
    return v


def read_node_key(doc: Mapping[str, Any], key: str, path: str = "") -> NodePublic:
    try:
        return NodePublic.from_b64(read_str(doc, key, path))
    except KeyError_ as e:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {e}") from None


def read_disco_key(doc: Mapping[str, Any], key: str, path: str = "") -> DiscoPublic:
    try:
        return DiscoPublic.from_b64(read_str(doc, key, path))
    except KeyError_ as e:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {e}") from None


def read_region(doc: Mapping[str, Any], key: str, path: str = "") -> int | None:
    v = read_opt_int(doc, key, path)
    if v is not None and not 1 <= v <= MAX_REGION:
        raise BadMessage(f"{path + '.' if path else ''}{key}: region {v} out of range")
    return v


def read_endpoints(doc: Mapping[str, Any], key: str, path: str = "") -> tuple[Endpoint, ...]:
    where = f"{path}.{key}" if path else key
    items = read_field(doc, key, list, path)
    if len(items) > MAX_ENDPOINTS:
        raise BadMessage(f"{where}: more than {MAX_ENDPOINTS} endpoints")
    out: list[Endpoint] = []
    for i, v in enumerate(items):
        if not isinstance(v, str):
            raise BadMessage(f"{where}[{i}]: expected a string")
        try:
            ep = parse_endpoint(v)
        except ValueError as e:
            raise BadMessage(f"{where}[{i}]: {e}") from None
        if ep not in out:
            out.append(ep)
    return tuple(out)


def read_ip(doc: Mapping[str, Any], key: str, cls: type[Any], path: str = "") -> Any:
    text = read_str(doc, key, path)
    try:
        return cls(text)
    except ValueError:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {text!r} is not valid") from None
