"""The relay's STUN server: both families, answers from the address asked, junk ignored."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.proto import stun
from agent.relay.stun_server import serve_stun


async def _ask(family: int, server: tuple[str, int], source: str) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        txid = stun.new_txid()
        sock.sendto(stun.binding_request(txid), server)
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), 5)
        got_txid, mapped = stun.parse_response(data)
        assert got_txid == txid
        assert mapped == (source, sock.getsockname()[1])
        return data, (str(addr[0]), int(addr[1]))
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_wildcard_answers_v4_and_v6_from_the_address_asked() -> None:
    answered: list[int] = []
    server = serve_stun(
        "", 0, asyncio.get_running_loop(), lambda ok: answered.append(1) if ok else None
    )
    try:
        _, src = await _ask(socket.AF_INET, ("127.0.0.1", server.port), "127.0.0.1")
        assert src == ("127.0.0.1", server.port)
        # another local address on lo: the answer must come from it, not from 127.0.0.1
        _, src = await _ask(socket.AF_INET, ("127.0.0.2", server.port), "127.0.0.1")
        assert src == ("127.0.0.2", server.port)
        if socket.has_ipv6:
            _, src6 = await _ask(socket.AF_INET6, ("::1", server.port), "::1")
            assert src6[0] == "::1"
        assert server.stats.answered == len(answered) >= 2
    finally:
        server.close()


@pytest.mark.asyncio
async def test_specific_address_and_junk_is_counted() -> None:
    server = serve_stun("127.0.0.1", 0, asyncio.get_running_loop(), lambda ok: None)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"not stun at all", ("127.0.0.1", server.port))
            s.sendto(
                stun.binding_request(stun.new_txid(), software=b"other"), ("127.0.0.1", server.port)
            )
        await _ask(socket.AF_INET, ("127.0.0.1", server.port), "127.0.0.1")
        assert server.stats.not_stun == 2
        assert server.stats.answered == 1
    finally:
        server.close()
