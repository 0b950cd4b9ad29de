"""The HTTP upgrade that opens a DERP stream: golden bytes, streaming, strictness.

Both sides as tailscale writes them: derp/derphttp/derphttp_client.go (connect) and
derp/derpserver/handler.go."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto.derp.upgrade import (
    MAX_HEAD_SIZE,
    Request,
    Response,
    client_request,
    parse_request,
    parse_response,
    server_response,
    simple_response,
)
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError

SERVER_PUB = bytes(range(32))
GOLDEN_REQUEST = (
    b"GET /derp HTTP/1.1\r\n"
    b"Host: derp.example.com:8443\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: DERP\r\n"
    b"\r\n"
)
GOLDEN_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: DERP\r\n"
    b"Connection: Upgrade\r\n"
    b"Derp-Version: 2\r\n"
    b"Derp-Public-Key: 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\r\n"
    b"\r\n"
)
FRAME_BYTES = b"\x01\x00\x00\x00\x28DERP\xf0\x9f\x94\x91"


def test_client_request_golden() -> None:
    assert client_request("derp.example.com:8443") == GOLDEN_REQUEST


def test_client_request_fast_start() -> None:
    raw = client_request("h", fast_start=True)
    assert raw.endswith(b"Upgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
    parsed = parse_request(raw)
    assert parsed is not None
    assert parsed[0].headers["derp-fast-start"] == "1"


def test_server_response_golden() -> None:
    assert server_response(SERVER_PUB) == GOLDEN_RESPONSE


def test_server_response_rejects_bad_key() -> None:
    with pytest.raises(LocalProtocolError):
        server_response(b"short")


def test_parse_request_go_client_bytes() -> None:
    raw = (
        b"GET /derp HTTP/1.1\r\nHost: derp1.example\r\nUser-Agent: Go-http-client/1.1\r\n"
        b"Connection: Upgrade\r\nIdeal-Node: 1a\r\nUpgrade: DERP\r\n\r\n"
    )
    parsed = parse_request(raw + FRAME_BYTES)
    assert parsed is not None
    request, leftover = parsed
    assert request == Request(
        "GET",
        "/derp",
        {
            "host": "derp1.example",
            "user-agent": "Go-http-client/1.1",
            "connection": "Upgrade",
            "ideal-node": "1a",
            "upgrade": "DERP",
        },
    )
    assert leftover == FRAME_BYTES


def test_parse_response_keeps_stream_bytes() -> None:
    parsed = parse_response(GOLDEN_RESPONSE + FRAME_BYTES)
    assert parsed is not None
    response, leftover = parsed
    assert response.status == 101
    assert response.reason == "Switching Protocols"
    assert response.headers["derp-public-key"] == SERVER_PUB.hex()
    assert response.headers["derp-version"] == "2"
    assert leftover == FRAME_BYTES


@pytest.mark.parametrize(
    ("raw", "parser"),
    [
        (GOLDEN_REQUEST + FRAME_BYTES, parse_request),
        (GOLDEN_RESPONSE + FRAME_BYTES, parse_response),
    ],
)
def test_byte_by_byte(raw: bytes, parser: object) -> None:
    assert callable(parser)
    head_len = raw.index(b"\r\n\r\n") + 4
    for n in range(head_len):
        assert parser(raw[:n]) is None, n
    for n in range(head_len, len(raw) + 1):
        result = parser(raw[:n])
        assert result is not None
        assert result[1] == raw[head_len:n]


def test_repeated_headers_are_joined_and_ows_trimmed() -> None:
    raw = b"GET /x HTTP/1.0\r\nX-A:  one \r\nx-a:\ttwo\r\nEmpty:\r\n\r\n"
    parsed = parse_request(raw)
    assert parsed is not None
    assert parsed[0].headers == {"x-a": "one, two", "empty": ""}


def test_simple_response() -> None:
    raw = simple_response(204, "No Content", {"X-Tailscale-Response": "response ts_h"}, b"")
    assert raw == b"HTTP/1.1 204 No Content\r\nX-Tailscale-Response: response ts_h\r\n\r\n"
    raw = simple_response(404, "Not Found", {}, b"nope\n")
    assert raw == b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope\n"
    parsed = parse_response(raw)
    assert parsed == (Response(404, "Not Found", {"content-length": "5"}), b"nope\n")
    with pytest.raises(LocalProtocolError):
        simple_response(204, "No Content", {}, b"body")
    with pytest.raises(LocalProtocolError):
        simple_response(200, "OK", {"Bad Name": "x"}, b"")
    with pytest.raises(LocalProtocolError):
        simple_response(200, "OK", {"X": "a\r\nInjected: 1"}, b"")


def test_oversize_head_rejected() -> None:
    raw = b"GET /derp HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_SIZE
    with pytest.raises(MalformedPacket):
        parse_request(raw)
    with pytest.raises(MalformedPacket):
        parse_request(raw + b"\r\n\r\n")
    # Just under the limit is fine.
    head = b"GET /derp HTTP/1.1\r\nX-Pad: "
    fill = MAX_HEAD_SIZE - len(head)
    assert parse_request(head + b"a" * fill + b"\r\n\r\n") is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
        b"GET /derp HTTP/2\r\n",
        b"GET  /derp HTTP/1.1\r\n",
        b"GET /derp HTTP/1.1\n\n",
        b"G\xc3\xa9T /derp HTTP/1.1\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nHost example\r\n\r\n",
        b"GET /derp HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET /derp HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_garbage_request_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_request(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 1010 Nope\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 101 Switching\r\nUpgrade DERP\r\n\r\n",
    ],
)
def test_garbage_response_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_response(raw)


def _check_total(parser: Callable[[bytes], tuple[object, bytes] | None], data: bytes) -> None:
    """Any input yields None, a head plus a suffix of the input, or a RemoteProtocolError."""
    try:
        result = parser(data)
    except RemoteProtocolError:
        return
    if result is not None:
        assert data.endswith(result[1])
        assert len(data) - len(result[1]) <= MAX_HEAD_SIZE + 4


@given(st.binary(max_size=300))
def test_fuzz_request_raises_only_remote_errors(data: bytes) -> None:
    _check_total(parse_request, data)


@given(st.binary(max_size=300))
def test_fuzz_response_raises_only_remote_errors(data: bytes) -> None:
    _check_total(parse_response, data)


@given(
    st.lists(st.sampled_from([b"GET", b" ", b"/derp", b"HTTP/1.1", b"\r\n", b":", b"a", b"\xff"]))
)
def test_fuzz_structured_request(parts: list[bytes]) -> None:
    _check_total(parse_request, b"".join(parts))
