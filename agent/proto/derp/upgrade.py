"""The HTTP/1.1 exchange that opens a DERP stream, sans-I/O (tailscale derp/derphttp).

    client -> server   GET /derp HTTP/1.1 | Host | Connection: Upgrade | Upgrade: DERP | blank line
    server -> client   HTTP/1.1 101 Switching Protocols | Upgrade: DERP | Connection: Upgrade |
                       Derp-Version: 2 | Derp-Public-Key: <64 hex> | blank line

Bytes after either blank line already belong to the DERP frame stream, so both parsers hand them
back as `leftover`. The parsers are deliberately small and strict: CRLF line endings only, no
obs-fold continuation lines, token-only methods and header names, printable ASCII everywhere, and
at most MAX_HEAD_SIZE bytes of head. They return None while the blank line has not arrived yet and
raise only MalformedPacket (a RemoteProtocolError). Other endpoints (/generate_204, probes) are
answered with `simple_response`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from agent.proto.derp.frames import PROTOCOL_VERSION
from agent.proto.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "MAX_HEAD_SIZE",
    "DERP_PATH",
    "Request",
    "Response",
    "client_request",
    "parse_request",
    "server_response",
    "parse_response",
    "simple_response",
]

MAX_HEAD_SIZE: Final = 16 * 1024
DERP_PATH: Final = "/derp"
_END: Final = b"\r\n\r\n"
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE: Final = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\x20-\x7e\t]*))?")
_FIELD_VALUE: Final = re.compile(rb"[\x20-\x7e\t]*")
_REASON_OK: Final = re.compile(r"[\x20-\x7e\t]*")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(hash=False)  # lower-case names; repeats joined with ", "


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(hash=False)


# --- encoding -------------------------------------------------------------------------------------


def _check_field(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name.encode("ascii", "replace")):
        raise LocalProtocolError(f"bad header name {name!r}")
    if not _REASON_OK.fullmatch(value) or value != value.strip():
        raise LocalProtocolError(f"bad value for header {name!r}")


def _head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first_line]
    for name, value in headers:
        _check_field(name, value)
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def client_request(host: str, fast_start: bool = False) -> bytes:
    """The GET that asks `host` (with ":port" when not 443) to switch to DERP framing."""
    headers = [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "DERP")]
    if fast_start:
        headers.append(("Derp-Fast-Start", "1"))
    return _head(f"GET {DERP_PATH} HTTP/1.1", headers)


def server_response(server_public: bytes) -> bytes:
    """The 101 a server sends before its ServerKey frame (unless the client asked fast start)."""
    if len(server_public) != 32:
        raise LocalProtocolError("server public key must be 32 bytes")
    headers = [
        ("Upgrade", "DERP"),
        ("Connection", "Upgrade"),
        ("Derp-Version", str(PROTOCOL_VERSION)),
        ("Derp-Public-Key", server_public.hex()),
    ]
    return _head("HTTP/1.1 101 Switching Protocols", headers)


def simple_response(status: int, reason: str, headers: dict[str, str], body: bytes) -> bytes:
    """A complete response with Content-Length (omitted for 1xx/204/304) and the given headers."""
    if not 100 <= status <= 999 or not _REASON_OK.fullmatch(reason):
        raise LocalProtocolError(f"bad status line {status} {reason!r}")
    fields = list(headers.items())
    if status >= 200 and status not in (204, 304):
        fields.append(("Content-Length", str(len(body))))
    elif body:
        raise LocalProtocolError(f"status {status} cannot carry a body")
    return _head(f"HTTP/1.1 {status} {reason}", fields) + body


# --- parsing --------------------------------------------------------------------------------------


def _split_head(buf: bytes, first_line: re.Pattern[bytes], what: str) -> tuple[bytes, bytes] | None:
    """(head without the final CRLFCRLF, leftover) or None when more bytes are needed."""
    end = buf.find(_END, 0, MAX_HEAD_SIZE + len(_END))
    if end < 0:
        if len(buf) >= MAX_HEAD_SIZE + len(_END):
            raise MalformedPacket(f"HTTP {what} head over {MAX_HEAD_SIZE} bytes")
        # Reject garbage early: once the first line is complete it must already be valid.
        eol = buf.find(b"\r\n")
        if eol >= 0 and not first_line.fullmatch(buf[:eol]):
            raise MalformedPacket(f"bad HTTP {what} line")
        if eol < 0 and (b"\n" in buf or b"\x00" in buf):
            raise MalformedPacket(f"bad HTTP {what} line")
        return None
    return buf[:end], buf[end + len(_END) :]


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise MalformedPacket("bad HTTP header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise MalformedPacket("bad HTTP header value")
        key = name.decode("ascii").lower()
        text = value.decode("ascii")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def parse_request(buf: bytes) -> tuple[Request, bytes] | None:
    """The request head at the start of `buf` and the bytes after it, or None for "need more"."""
    split = _split_head(bytes(buf), _REQUEST_LINE, "request")
    if split is None:
        return None
    head, leftover = split
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise MalformedPacket("bad HTTP request line")
    method, path = match.group(1).decode("ascii"), match.group(2).decode("ascii")
    return Request(method, path, _parse_headers(lines[1:])), leftover


def parse_response(buf: bytes) -> tuple[Response, bytes] | None:
    """The response head at the start of `buf` and the bytes after it, or None for "need more"."""
    split = _split_head(bytes(buf), _STATUS_LINE, "status")
    if split is None:
        return None
    head, leftover = split
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise MalformedPacket("bad HTTP status line")
    status = int(match.group(2))
    reason = (match.group(3) or b"").decode("ascii")
    return Response(status, reason, _parse_headers(lines[1:])), leftover
