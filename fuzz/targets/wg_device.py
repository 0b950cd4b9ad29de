"""WireGuard Device.receive_batch with arbitrary datagrams, on a device that holds a session.

Contract (agent/proto/wireguard/device.py): receive_batch never raises for bad input; every bad
datagram is dropped and counted in `drops`, non-WireGuard ones come back in `foreign`.

Input: mode byte, then datagrams (u16 length + bytes each):
    0  raw datagrams from the peer's endpoint
    1  plaintexts, sealed by the peer's live session (reach the inner IP header checks)
    2  real datagrams (initiation, response, transport, cookie reply) XOR-ed with the input
    3  handshake bodies given a valid mac1 (reach the Noise decryption), on a device under load
       for odd sub-modes (mac2/cookie reply/rate limit path)
The device is rebuilt every REBUILD inputs so that state from old inputs does not pile up; the
invariant checks: raw random datagrams are each counted once (a drop or `foreign`).
"""

from __future__ import annotations

import random
from ipaddress import ip_network

from agent.keys import NodePrivate
from agent.proto.wireguard.cookie import CookieGenerator
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import Peer
from fuzz.common import Data, Seed, check
from fuzz.targets.wg_messages import vector_messages, vector_plaintexts

A_EP = ("198.18.0.1", 41641)
B_EP = ("198.18.0.2", 41641)
REBUILD = 2000
_KA = NodePrivate.from_hex("a8" * 31 + "40")
_KB = NodePrivate.from_hex("b0" * 31 + "50")


def _seeded(seed: int):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def _ipv4(src: bytes, dst: bytes, payload: bytes) -> bytes:
    total = 20 + len(payload)
    return (
        bytes([0x45, 0, total >> 8, total & 0xFF, 0, 1, 0, 0, 64, 17, 0, 0]) + src + dst + payload
    )


class _World:
    """Devices A and B with a completed handshake; B is the one under test."""

    def __init__(self, under_load: bool) -> None:
        self.now = 100.0
        threshold = 0 if under_load else 1 << 30
        self.a = Device(_KA, randbytes=_seeded(1), wall_offset=1.7e9)
        self.b = Device(
            _KB, randbytes=_seeded(2), wall_offset=1.7e9, under_load_threshold=threshold
        )
        self.pa: Peer = self.a.add_peer(
            _KB.public(), endpoint=B_EP, allowed_ips=[ip_network("100.64.0.2/32")]
        )
        self.pb: Peer = self.b.add_peer(
            _KA.public(), endpoint=A_EP, allowed_ips=[ip_network("100.64.0.0/24")]
        )
        self.samples: list[bytes] = []
        init = self.pa.encrypt([_ipv4(b"d@\0\1", b"d@\0\2", b"x")], self.now)
        self.samples += init
        res = self.b.receive_batch(init, A_EP, self.now)
        for data, _ in res.replies:
            self.samples.append(data)
            back = self.a.receive_batch([data], B_EP, self.now)
            for d2, _ in back.replies:
                self.samples.append(d2)
                self.b.receive_batch([d2], A_EP, self.now)
        self.samples += self.pa.encrypt([_ipv4(b"d@\0\1", b"d@\0\2", b"hello")], self.now)
        self.mac = CookieGenerator(_KB.public())
        self.count = 0


class Harness:
    name = "wg_device"
    contract = "never raises (drops counted)"
    dictionary = (b"\x01\x00\x00\x00", b"\x02\x00\x00\x00", b"\x03\x00\x00\x00",
                  b"\x04\x00\x00\x00", b"\x45\x00", b"\x60\x00\x00\x00", b"d@\x00\x01")  # fmt: skip

    def __init__(self) -> None:
        self._worlds = [_World(False), _World(True)]

    def _world(self, under_load: bool) -> _World:
        i = int(under_load)
        w = self._worlds[i]
        w.count += 1
        if w.count > REBUILD:
            w = self._worlds[i] = _World(under_load)
        return w

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte()
        kind = mode & 3
        w = self._world(kind == 3 and bool(mode & 4))
        w.now += (d.byte() & 0x0F) * 0.25
        pieces = d.chunks()
        if kind == 1:
            datagrams = w.pa.encrypt(pieces, w.now) if pieces else []
        elif kind == 2:
            datagrams = []
            for p in pieces:
                base = bytearray(w.samples[p[0] % len(w.samples)] if p else w.samples[0])
                for i, x in enumerate(p[1:]):
                    base[i % len(base)] ^= x
                datagrams.append(bytes(base))
        elif kind == 3:
            datagrams = []
            for p in pieces:
                size = 148 if not p or p[0] & 1 else 92
                msg = bytearray((p[1:] + bytes(size))[:size])
                msg[0:4] = (b"\x01" if size == 148 else b"\x02") + b"\0\0\0"
                w.mac.add_macs(msg, w.now)
                datagrams.append(bytes(msg))
        else:
            datagrams = pieces
        before = sum(w.b.drops.values())
        res = w.b.receive_batch(datagrams, A_EP, w.now)
        dropped = sum(w.b.drops.values()) - before
        check(dropped >= 0, "drop counters went down")
        if kind == 0:
            check(
                dropped + len(res.foreign) == len(datagrams),
                f"{len(datagrams)} raw datagrams: {dropped} drops + {len(res.foreign)} foreign",
            )
        check(len(res.packets) <= len(datagrams), "more packets than datagrams")
        w.b.events()
        return f"{kind}:{dropped}:{len(res.packets)}:{len(res.replies)}:{len(res.foreign)}"

    def seeds(self) -> list[bytes]:
        msgs = vector_messages()
        plain = vector_plaintexts()
        out = [
            Seed().byte(0).byte(0).chunks(msgs).build(),
            Seed().byte(1).byte(0).chunks([_ipv4(b"d@\0\1", b"d@\0\2", b"hi"), b""]).build(),
            Seed().byte(1).byte(1).chunks(plain).build(),
            Seed().byte(2).byte(0).chunks([b"\x00", b"\x01\x00\x00\x00\x00\x01", b"\x02"]).build(),
            Seed().byte(3).byte(0).chunks([b"\x01" + bytes(147), b"\x00" + bytes(91)]).build(),
            Seed().byte(7).byte(2).chunks([b"\x01" + bytes(147)]).build(),
        ]
        return out
