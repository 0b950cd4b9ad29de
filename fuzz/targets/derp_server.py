"""RelayCore.receive_data on one connection in each state, next to live clients.

Contract (agent/proto/derp/server/core.py): a protocol error closes that connection only (a
CloseConnection event) and raises RemoteProtocolError; nothing else escapes. Invariants: after
an error the connection is closed and other clients stay registered; once the connection is
gone, the relay's connection and client tables are back to their size before the input.

Input: mode byte, split byte, stream bytes. Mode bits 0-2 pick the connection's start:
    0  fresh (AWAIT_CLIENT_INFO)
    1  registered client          2  registered client with the key of the other client (dup)
    3  registered mesh peer       4  registered under a receive rate limit
    5  fresh, then a ClientInfo box whose JSON is the stream bytes
    6  registered, stream fed as one read      7  mesh peer watching (WatchConns sent)
"""

from __future__ import annotations

import random

from nacl.public import Box, PrivateKey

from agent.proto.derp.frames import (
    NONCE_LEN,
    ClientInfo,
    ForwardPacket,
    Ping,
    SendPacket,
    WatchConns,
    seal_client_info,
)
from agent.proto.derp.server import ConnState, RelayCore
from agent.proto.errors import RemoteProtocolError
from fuzz.common import Data, Seed, check, tag
from fuzz.targets.derp_frames import NONCE, SERVER_PRIV, SERVER_PUB, golden_frames

MESH_KEY = bytes(range(100, 132))
_PRIVS = [bytes([0x30 + i]) * 32 for i in range(3)]
_PUBS = [bytes(PrivateKey(p).public_key) for p in _PRIVS]
REBUILD = 5000


def _client_info(i: int, info: dict[str, object]) -> bytes:
    return ClientInfo(_PUBS[i], seal_client_info(_PRIVS[i], SERVER_PUB, info, NONCE)).encode()


_LOGIN = _client_info(1, {"version": 2})
_LOGIN_DUP = _client_info(0, {"version": 2})
_LOGIN_MESH = _client_info(2, {"version": 2, "meshKey": MESH_KEY.hex()})


class _World:
    def __init__(self, rng: random.Random, limited: bool) -> None:
        self.core = RelayCore(SERVER_PRIV, randbytes=rng.randbytes, mesh_key=MESH_KEY)
        self.now = 1000.0
        self.next_id = 10
        # A client that stays connected (packets get routed to it) and a mesh node's client.
        self.core.connection_made(1, self.now, ("198.18.0.9", 1234))
        self.core.receive_data(1, _LOGIN_DUP, self.now)
        self.core.connection_made(2, self.now)
        self.core.receive_data(2, _LOGIN_MESH, self.now)
        self.core.mesh_peer_present("n2", bytes(range(50, 82)))
        if limited:
            self.core.set_rate_limit(100_000.0, 0.0, self.now)
        self.drain()
        self.base = (len(self.core._conns), self.core.client_counts())
        self.count = 0

    def drain(self) -> None:
        self.core.take_output()
        self.core.events()


class Harness:
    name = "derp_server"
    contract = "RemoteProtocolError, after closing that connection only"
    dictionary = (b"\x04\x00\x00\x00\x23", b"\x0a\x00\x00\x00\x43", b"\x10\x00\x00\x00\x00",
                  b"\x11\x00\x00\x00\x20", b"\x12\x00\x00\x00\x08", b"\x07\x00\x00\x00\x01",
                  _PUBS[0], bytes(range(50, 82)), b"{", b"[")  # fmt: skip

    def __init__(self) -> None:
        self._rng = random.Random(3)
        self._worlds = [_World(self._rng, False), _World(self._rng, True)]
        self._box = Box(PrivateKey(_PRIVS[1]), PrivateKey(SERVER_PRIV).public_key)

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() & 7
        split = d.byte()
        stream = d.rest()
        wi = int(mode == 4)
        w = self._worlds[wi]
        w.count += 1
        if w.count > REBUILD:
            w = self._worlds[wi] = _World(self._rng, wi == 1)
        core = w.core
        w.next_id += 1
        cid = w.next_id
        w.now += 0.5
        core.connection_made(cid, w.now, ("198.18.0.1", 41641))
        try:
            if mode in (1, 4, 6):
                core.receive_data(cid, _LOGIN, w.now)
            elif mode == 2:
                core.receive_data(cid, _LOGIN_DUP, w.now)
            elif mode in (3, 7):
                core.receive_data(cid, _LOGIN_MESH, w.now)
                if mode == 7:
                    core.receive_data(cid, WatchConns().encode(), w.now)
            elif mode == 5:
                sealed = bytes(self._box.encrypt(stream, NONCE))
                stream = ClientInfo(_PUBS[1], sealed).encode() if len(sealed) < 200_000 else b""
            w.drain()
            pieces = [stream] if mode == 6 else Data(bytes([split])).stream_split(stream)
            outcome = "ok"
            for i, piece in enumerate(pieces):
                try:
                    core.receive_data(cid, piece, w.now + i * 0.01)
                except RemoteProtocolError as exc:
                    check(core._conns[cid].state is ConnState.CLOSED, "error without closing")
                    core.receive_data(cid, b"\x06\x00\x00\x00\x00", w.now)  # ignored: closed
                    outcome = tag(exc)
                    break
                core.on_timer(w.now + i * 0.01)
                w.drain()
            core.on_timer(w.now + 200.0 if mode == 0 else w.now + 1.0)
            check(_PUBS[0] in core.clients() or mode == 2, "the other client was dropped")
        finally:
            core.connection_lost(cid)
            w.drain()
        size = (len(core._conns), core.client_counts())
        check(size == w.base, f"tables grew: {size} != {w.base}")
        return f"{mode}:{outcome}"

    def seeds(self) -> list[bytes]:
        frames = golden_frames()
        steady = b"".join(frames[3:])
        packets = b"".join(
            [SendPacket(_PUBS[0], b"\x01\x02\x03").encode()] * 3
            + [SendPacket(bytes(range(50, 82)), b"TS\xf0\x9f\x92\xac" + bytes(60)).encode()]
            + [SendPacket(bytes(32 * [9]), b"x").encode(), Ping(bytes(8)).encode()]
        )
        fwd = ForwardPacket(_PUBS[1], _PUBS[0], b"\x01").encode()
        return [
            Seed().byte(0).byte(0).raw(_LOGIN + packets).build(),
            Seed().byte(0).byte(5).raw(frames[1] + steady).build(),
            Seed().byte(1).byte(0).raw(packets + steady).build(),
            Seed().byte(1).byte(3).raw(packets).build(),
            Seed().byte(2).byte(0).raw(packets).build(),
            Seed().byte(3).byte(0).raw(fwd + WatchConns().encode() + frames[11]).build(),
            Seed().byte(4).byte(0).raw(packets * 20).build(),
            Seed().byte(5).byte(0).raw(b'{"version":2,"isProber":true}').build(),
            Seed().byte(6).byte(0).raw(packets + b"\x04\x00\x00").build(),
            Seed().byte(7).byte(9).raw(fwd + frames[11]).build(),
        ]


assert len(NONCE) == NONCE_LEN
