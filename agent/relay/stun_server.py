"""The relay's STUN server: answers Binding Requests over IPv4 and IPv6, from the address asked.

With a wildcard listen address one dual-stack socket (`::`, IPV6_V6ONLY off) takes both
families; IPV6_RECVPKTINFO tells which local address each request was sent to and the answer
leaves from that same address (IPV6_PKTINFO on sendmsg), so a multi-homed relay never answers
from another address than the client asked (a NAT would drop such an answer). With a specific
listen address the socket is bound to it. One `add_reader` drains every queued datagram per
wake-up; answers are small and sent at once. Anything that is not a Binding Request (with
derper's SOFTWARE attribute rule, see agent/proto/stun.py) is counted and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from agent.proto import stun
from agent.proto.errors import RemoteProtocolError

__all__ = ["StunServer", "StunStats", "serve_stun"]

IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_PKTINFO6 = struct.Struct("16sI")  # struct in6_pktinfo: address, interface index
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO6.size)
_MAX_PER_WAKEUP = 256


@dataclass(slots=True)
class StunStats:
    answered: int = 0
    not_stun: int = 0
    send_errors: int = 0


class StunServer:
    """A bound STUN socket on the loop; `port` is the bound port; `close()` stops it."""

    def __init__(
        self, sock: socket.socket, pktinfo: bool, on_request: Callable[[bool], None]
    ) -> None:
        self.sock = sock
        self.pktinfo = pktinfo
        self.stats = StunStats()
        self.port: int = sock.getsockname()[1]
        self._on_request = on_request
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def _readable(self) -> None:
        sock = self.sock
        for _ in range(_MAX_PER_WAKEUP):
            try:
                data, ancdata, _flags, addr = sock.recvmsg(2048, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. an ICMP error queued on the socket: nothing to answer
            self._answer(data, ancdata, addr)

    def _answer(self, data: bytes, ancdata: list[tuple[int, int, bytes]], addr: tuple) -> None:  # type: ignore[type-arg]
        try:
            txid = stun.parse_binding_request(data)
        except RemoteProtocolError:
            self.stats.not_stun += 1
            self._on_request(False)
            return
        host = str(addr[0]).partition("%")[0]
        port = int(addr[1])
        mapped = _unmap(host)
        reply = stun.binding_response(txid, (mapped, port))
        cmsgs = []
        if self.pktinfo:
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
                    local, _ifindex = _PKTINFO6.unpack_from(value)
                    # ifindex 0: let routing pick the interface, keep the source address
                    cmsgs.append((socket.IPPROTO_IPV6, IPV6_PKTINFO, _PKTINFO6.pack(local, 0)))
        try:
            self.sock.sendmsg([reply], cmsgs, 0, addr)
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.answered += 1
        self._on_request(True)


def _unmap(host: str) -> str:
    """IPv4-mapped IPv6 (a v4 client on the dual-stack socket) back to the IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


def serve_stun(
    host: str, port: int, loop: asyncio.AbstractEventLoop, on_request: Callable[[bool], None]
) -> StunServer:
    """A STUN server on host:port (wildcard "" / "0.0.0.0" / "::": every address, both
    families, answering from the address asked); port 0 picks a free port. `on_request(True)`
    after each answer, `on_request(False)` for each datagram that was no Binding Request."""
    wildcard = host in ("", "0.0.0.0", "::")
    if wildcard or ":" in host:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            sock.bind(("::" if wildcard else host, port))
        except OSError:
            sock.close()
            if not wildcard:
                raise
            return _ipv4_only("0.0.0.0", port, loop, on_request)  # no IPv6 on this host
        sock.setblocking(False)
        server = StunServer(sock, pktinfo=wildcard, on_request=on_request)
    else:
        return _ipv4_only(host, port, loop, on_request)
    server.attach(loop)
    return server


def _ipv4_only(
    host: str, port: int, loop: asyncio.AbstractEventLoop, on_request: Callable[[bool], None]
) -> StunServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    server = StunServer(sock, pktinfo=False, on_request=on_request)
    server.attach(loop)
    return server
