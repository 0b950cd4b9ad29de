"""The UDP socket of the data plane: batched receive with UDP_GRO, batched send with UDP_SEGMENT.

One dual-stack socket (AF_INET6, IPV6_V6ONLY=0, bound to "::") serves IPv4 and IPv6 peers;
IPv4 peers appear in the kernel as ::ffff:a.b.c.d and are normalised at this boundary, so the
rest of the agent only sees ("198.18.0.2", 51820). Without IPv6 the socket is plain AF_INET.

Send: runs of equal-size datagrams to one address (the last of a run may be shorter) leave in
one `sendmsg` carrying a UDP_SEGMENT cmsg: the kernel cuts them, ~3.7x the packets/s of one
`sendto` each. Receive: with UDP_GRO the kernel hands over up to 64 KB of back-to-back
datagrams of one flow with their size in a cmsg, ~7x fewer syscalls. Python 3.11 has neither
constant, so the raw numbers (103, 104) are used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final

__all__ = [
    "Endpoint",
    "UdpSocket",
    "open_udp",
    "normalise",
    "MAX_GSO_SEGMENTS",
    "MAX_GSO_BYTES",
]

Endpoint = tuple[str, int]
Buffer = bytes | bytearray | memoryview

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33

MAX_GSO_SEGMENTS: Final = 64
MAX_GSO_BYTES: Final = 65507  # 65535 - 20 (IPv4) - 8 (UDP)
RECV_SIZE: Final = 0xFFFF
DEFAULT_BUFFER_BYTES: Final = 8 << 20

_GSO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_U16_NATIVE = struct.Struct("=H")
_INT_NATIVE = struct.Struct("=i")
_V4_MAPPED: Final = "::ffff:"


class UdpSocket:
    """A non-blocking UDP socket with batched, GSO/GRO-aware receive and send.

    Counters: `send_dropped` (ENOBUFS/EAGAIN, the kernel queue was full), `send_errors`
    (any other OSError, last one in `last_error`).
    """

    def __init__(self, sock: socket.socket, *, gso: bool, gro: bool) -> None:
        self.sock = sock
        self.family = sock.family
        self.gso = gso
        self.gro = gro
        self.send_dropped = 0
        self.send_errors = 0
        self.last_error: OSError | None = None
        self._targets: dict[Endpoint, tuple[str, int]] = {}
        # the kernel's source address tuples, normalised once (and the same Endpoint object
        # every time, which makes the endpoint comparisons downstream identity checks)
        # (and a compiled receive's raw struct sockaddr, `source_of`)
        self._sources: dict[tuple[object, ...] | bytes, Endpoint] = {}
        # The compiled send batch (agent._fastpath.udp_send) and raw addresses for it, once
        # `use_native` was called; None: the Python batch below.
        self.native: ModuleType | None = None  # agent._fastpath once `use_native` was called
        self._native_send: Callable[..., tuple[int, int, int, bool]] | None = None
        self._sockaddr: Callable[[int, str, int], bytes] | None = None
        self._raw_targets: dict[Endpoint, bytes | None] = {}  # None: not a literal address

    def use_native(self, mod: ModuleType) -> None:
        """Send batches with the compiled twin of `send_batch` (same grouping and counters)."""
        self.native = mod
        self._native_send = mod.udp_send
        self._sockaddr = mod.sockaddr

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ addresses

    def _target(self, addr: Endpoint) -> tuple[str, int]:
        target = self._targets.get(addr)
        if target is None:
            host, port = addr
            if self.family == socket.AF_INET6 and ":" not in host:
                host = _V4_MAPPED + host
            target = (host, port)
            if len(self._targets) > 4096:
                self._targets.clear()
            self._targets[addr] = target
        return target

    # ------------------------------------------------------------------ receive

    def recv_batch(self, max_datagrams: int) -> list[tuple[list[memoryview], Endpoint]]:
        """Receive until EAGAIN or `max_datagrams`: (datagrams of one GRO buffer, source) each."""
        out: list[tuple[list[memoryview], Endpoint]] = []
        recvmsg = self.sock.recvmsg
        sources = self._sources
        count = 0
        while count < max_datagrams:
            try:
                data, ancdata, _flags, raw = recvmsg(RECV_SIZE, _GSO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue  # an ICMP error queued for this socket: nothing to deliver
            view = memoryview(data)
            size = 0
            for level, kind, cdata in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(cdata) >= 4:
                    size = _INT_NATIVE.unpack_from(cdata)[0]
            n = len(data)
            parts = [view[i : i + size] for i in range(0, n, size)] if 0 < size < n else [view]
            count += len(parts)
            src = sources.get(raw)
            if src is None:
                if len(sources) > 4096:
                    sources.clear()
                src = sources[raw] = normalise(raw)
            out.append((parts, src))
        return out

    # ------------------------------------------------------------------ send

    def send_batch(self, datagrams: Sequence[Buffer], addr: Endpoint) -> int:
        """Send every datagram to `addr`; returns how many were not sent (counted as well)."""
        native = self._native_send
        if native is not None:
            raw = self.raw_target(addr)
            if raw is not None:
                return self._send_native(native, datagrams, raw)
        target = self._target(addr)
        n = len(datagrams)
        if not self.gso or n == 1:
            return self._send_each(datagrams, target)
        sizes = list(map(len, datagrams))
        failed = 0
        i = 0
        while i < n:
            size = sizes[i]
            # a datagram too large for UDP (EMSGSIZE) still goes alone, not in an empty group
            limit = min(n, i + MAX_GSO_SEGMENTS, i + max(1, MAX_GSO_BYTES // max(size, 1)))
            if not size:
                j = i + 1  # an empty datagram: GSO would merge a run of them into one
            elif sizes[i:limit].count(size) == limit - i:
                j = limit  # the usual case: a whole run of equal sizes, counted in C
            else:
                j = i + 1
                while j < limit and sizes[j] == size:
                    j += 1
                if j < limit and 0 < sizes[j] < size:
                    j += 1  # a shorter datagram may end a GSO run
            if j - i == 1:
                failed += self._send_each(datagrams[i:j], target)
            else:
                failed += self._send_gso(datagrams[i:j], size, target)
            i = j
        return failed

    def raw_target(self, addr: Endpoint) -> bytes | None:
        try:
            return self._raw_targets[addr]
        except KeyError:
            pass
        host, port = self._target(addr)
        raw: bytes | None = None
        if self._sockaddr is not None:
            with contextlib.suppress(ValueError):  # a scoped or odd address: the Python path
                raw = self._sockaddr(self.family, host, port)
        if len(self._raw_targets) > 4096:
            self._raw_targets.clear()
        self._raw_targets[addr] = raw
        return raw

    def source_of(self, raw: bytes) -> Endpoint:
        """The Endpoint of a raw struct sockaddr_in / sockaddr_in6 (a compiled receive's
        source, or `raw_target`'s output), named as `recv_batch` names sources."""
        src = self._sources.get(raw)
        if src is None:
            family = int.from_bytes(raw[0:2], "little")
            port = int.from_bytes(raw[2:4], "big")
            if family == socket.AF_INET:
                host = socket.inet_ntop(socket.AF_INET, raw[4:8])
            else:
                host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            if len(self._sources) > 4096:
                self._sources.clear()
            src = self._sources[raw] = normalise((host, port))
        return src

    def sends_from_main(self, addr: Endpoint) -> bool:
        """Always: this is the one socket."""
        return True

    def count_send_failures(self, dropped: int, errors: int, err: int) -> None:
        """Datagrams a compiled batch could not send (agent/node/lanes.py)."""
        self.send_dropped += dropped
        if errors:
            self.send_errors += errors
            self.last_error = OSError(err, os.strerror(err))

    def _send_native(
        self,
        native: Callable[..., tuple[int, int, int, bool]],
        datagrams: Sequence[Buffer],
        raw: bytes,
    ) -> int:
        dropped, errors, err, self.gso = native(self.sock.fileno(), raw, datagrams, self.gso)
        if dropped or errors:
            self.count_send_failures(dropped, errors, err)
        return dropped + errors

    def _send_gso(self, group: Sequence[Buffer], size: int, target: tuple[str, int]) -> int:
        cmsg = [(SOL_UDP, UDP_SEGMENT, _U16_NATIVE.pack(size))]
        try:
            self.sock.sendmsg(group, cmsg, 0, target)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += len(group)
            return len(group)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.send_dropped += len(group)
                return len(group)
            if e.errno in (errno.EIO, errno.EINVAL):
                # GSO refused (no checksum offload on the egress device, or too large for
                # it): send one by one, and stop using GSO if that works.
                failed = self._send_each(group, target)
                if failed == 0:
                    self.gso = False
                return failed
            self.send_errors += len(group)
            self.last_error = e
            return len(group)
        return 0

    def _send_each(self, group: Sequence[Buffer], target: tuple[str, int]) -> int:
        sendto = self.sock.sendto
        failed = 0
        for dgram in group:
            try:
                sendto(dgram, target)
            except (BlockingIOError, InterruptedError):
                self.send_dropped += 1
                failed += 1
            except OSError as e:
                failed += 1
                if e.errno == errno.ENOBUFS:
                    self.send_dropped += 1
                else:
                    self.send_errors += 1
                    self.last_error = e
        return failed


def normalise(raw: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    """The Endpoint of a kernel source address (::ffff:a.b.c.d becomes a.b.c.d)."""
    host = raw[0]
    if host.startswith(_V4_MAPPED) and "." in host:
        host = host[len(_V4_MAPPED) :]
    return host, int(raw[1])


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp(
    port: int,
    *,
    host: str | None = None,
    ipv6: bool | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    gso: bool = True,
    gro: bool = True,
) -> UdpSocket:
    """Bind a non-blocking UDP socket on `port` (0 picks one), dual-stack when IPv6 works.

    `host` defaults to "::" (or "0.0.0.0"); an IPv4 `host` forces an AF_INET socket.
    Buffers are forced to `buffer_bytes` when allowed (root), else raised as far as the sysctl
    limits permit. GRO is enabled when the kernel accepts it; GSO is tried per send.
    """
    if ipv6 is None:
        ipv6 = (host is None or ":" in host) and _ipv6_available()
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, buffer_bytes)
        gro_on = False
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                gro_on = True
            except OSError:
                gro_on = False
        bind_host = host if host is not None else ("::" if ipv6 else "0.0.0.0")
        sock.bind((bind_host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return UdpSocket(sock, gso=gso, gro=gro_on)
