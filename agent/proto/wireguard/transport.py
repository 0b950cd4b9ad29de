"""Transport data messages in batches: the reference twin of the compiled module's crypto.

    seal(aead, remote_index, counter, packets) -> [datagram]
        One transport message per IP packet (b"" = keepalive), counters counter, counter+1, ...
    open_run(aead, replay, datagrams, start, index) -> OpenedRun
        From datagrams[start], every consecutive transport message for receiver `index`:
        authenticate (AEAD), then the replay window, then the IP header (version, length;
        padding trimmed). Stops at the first datagram that is not one (the caller looks at it).

    Sealer(aead, remote_index)
        A session's sending half: `seal(packets)` numbers them from `counter` and moves it on.
        Its Keypair and the data plane's lanes (agent/node/lanes.py) share this one counter.

A `Transport` bundles these with the AEAD, replay-window and sealer constructors. `PYTHON` is this
module (cryptography's ChaCha20Poly1305, `replay.ReplayWindow`); the node builds the same
bundle from `agent._fastpath` (native/crypto.c) when it loads, and the device never knows which
runs. tests/native/ feeds both the same keys, counters and bytes and requires the same output.

Transport data message (type 4):
    0      4              8                 16
    | 04 00 00 00 | receiver LE32 | counter LE64 | ChaCha20-Poly1305(payload padded to 16) + tag |
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.proto.wireguard.constants import MSG_TRANSPORT, TRANSPORT_MIN_SIZE
from agent.proto.wireguard.replay import ReplayWindow

__all__ = [
    "Aead",
    "Replay",
    "OpenedRun",
    "SealerLike",
    "Sealer",
    "Transport",
    "PYTHON",
    "seal",
    "open_run",
]

Buffer = bytes | bytearray | memoryview
_NONCE = struct.Struct("<4xQ")
_HEADER = struct.Struct("<IIQ")
_PREFIX = struct.Struct("<II")
_COUNTER = struct.Struct("<Q")
_PAD = [bytes(i) for i in range(16)]


class Aead(Protocol):
    """ChaCha20-Poly1305 under one key (cryptography's class or the compiled one)."""

    def encrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes: ...


class Replay(Protocol):
    def accept(self, counter: int) -> bool: ...


class SealerLike(Protocol):
    """A session's sending key and its one send counter (this module's `Sealer` or the
    compiled one)."""

    counter: int

    @property
    def remote_index(self) -> int: ...

    def seal(self, packets: Sequence[Buffer]) -> list[bytes]: ...


class OpenedRun(NamedTuple):
    """What `open_run` made of a run of transport messages for one receiver index."""

    next: int  # index of the first datagram not consumed
    packets: list[bytes]  # IP packets, padding trimmed
    sources: list[bytes]  # their distinct source addresses (4 or 16 bytes), first seen first
    authentication: int  # drops: AEAD failed
    replay: int  # drops: counter replayed or too old
    not_ip: int  # drops: neither IPv4 nor IPv6 (or shorter than its header)
    malformed: int  # drops: IP length field beyond the payload or below 20
    wire_bytes: int  # bytes of the datagrams that authenticated and were new
    data: bool  # one of them carried a packet (not only keepalives)


def seal(aead: Aead, remote_index: int, counter: int, packets: Sequence[Buffer]) -> list[bytes]:
    """Transport datagrams for `packets`, numbered from `counter` (the caller checks limits)."""
    encrypt = aead.encrypt
    prefix = _PREFIX.pack(MSG_TRANSPORT, remote_index)
    nonce = _NONCE.pack
    ctr_bytes = _COUNTER.pack
    pad = _PAD
    out: list[bytes] = []
    append = out.append
    ctr = counter
    for p in packets:
        r = -len(p) & 15
        if r:
            p = b"".join((p, pad[r]))
        append(b"".join((prefix, ctr_bytes(ctr), encrypt(nonce(ctr), p, None))))
        ctr += 1
    return out


def open_run(
    aead: Aead, replay: Replay, datagrams: Sequence[Buffer], start: int, index: int
) -> OpenedRun:
    """Open the transport messages for `index` from datagrams[start] on (see module doc)."""
    decrypt = aead.decrypt
    accept = replay.accept
    nonce = _NONCE.pack
    unpack = _HEADER.unpack_from
    packets: list[bytes] = []
    sources: list[bytes] = []
    auth = rep = not_ip = malformed = wire = 0
    data = False
    last_src: bytes | None = None
    i = max(start, 0)
    n = len(datagrams)
    while i < n:
        d = datagrams[i]
        m = len(d)
        if m < TRANSPORT_MIN_SIZE:
            break
        word, receiver, counter = unpack(d)
        if word != MSG_TRANSPORT or receiver != index:
            break
        i += 1
        try:
            pt = decrypt(nonce(counter), d[16:], None)
        except InvalidTag:
            auth += 1
            continue
        if not accept(counter):
            rep += 1
            continue
        wire += m
        k = len(pt)
        if not k:
            continue  # keepalive
        data = True
        v = pt[0] >> 4
        if v == 4 and k >= 20:
            length = (pt[2] << 8) | pt[3]
            src = pt[12:16]
        elif v == 6 and k >= 40:
            length = 40 + ((pt[4] << 8) | pt[5])
            src = pt[8:24]
        else:
            not_ip += 1
            continue
        if length > k or length < 20:
            malformed += 1
            continue
        if src != last_src:
            last_src = src
            if src not in sources:
                sources.append(src)
        packets.append(pt if length == k else pt[:length])
    return OpenedRun(i, packets, sources, auth, rep, not_ip, malformed, wire, data)


class Sealer:
    """`seal` under one key and receiver index, numbering from `counter` and moving it on."""

    __slots__ = ("aead", "counter", "remote_index")

    def __init__(self, aead: Aead, remote_index: int) -> None:
        self.aead = aead
        self.remote_index = remote_index
        self.counter = 0

    def seal(self, packets: Sequence[Buffer]) -> list[bytes]:
        out = seal(self.aead, self.remote_index, self.counter, packets)
        self.counter += len(out)
        return out


@dataclass(frozen=True, slots=True)
class Transport:
    """One implementation of the transport-message batches."""

    name: str  # "python" or "native"
    aead: Callable[[bytes], Aead]
    replay: Callable[[], Replay]
    seal: Callable[[Aead, int, int, Sequence[Buffer]], list[bytes]]
    open_run: Callable[[Aead, Replay, Sequence[Buffer], int, int], OpenedRun]
    sealer: Callable[[Aead, int], SealerLike]


PYTHON = Transport("python", ChaCha20Poly1305, ReplayWindow, seal, open_run, Sealer)
