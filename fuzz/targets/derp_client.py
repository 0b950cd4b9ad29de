"""DerpClientConn.receive_data: the client side of a DERP stream, in each login state.

Contract (agent/proto/derp/client.py): a protocol error closes the connection (a Closed event)
and raises RemoteProtocolError; nothing else escapes. Invariants: after an error the state is
CLOSED; once CLOSED, more bytes are ignored.

Input: state byte (0 fresh, 1 ServerKey done, 2 logged in, 3 logged in via a ServerInfo whose
JSON is the rest of the input), stream split byte, stream bytes.
"""

from __future__ import annotations

import random

from nacl.public import Box, PrivateKey

from agent.proto.derp.client import ClientState, Closed, DerpClientConn
from agent.proto.derp.frames import NONCE_LEN, ServerInfo, ServerKey, seal_server_info
from agent.proto.errors import RemoteProtocolError
from fuzz.common import Data, Seed, check, tag
from fuzz.targets.derp_frames import CLIENT_PRIV, NONCE, SERVER_PRIV, SERVER_PUB, golden_frames

_SERVER_KEY = ServerKey(SERVER_PUB).encode()


class Harness:
    name = "derp_client"
    contract = "RemoteProtocolError, after closing the connection"
    dictionary = (b"DERP\xf0\x9f\x94\x91", b"\x05\x00\x00\x00\x23", b"\x12\x00\x00\x00\x08",
                  b"\x08\x00\x00\x00\x21", b"\x09\x00\x00\x00\x33", b"{", b"[")  # fmt: skip

    def __init__(self) -> None:
        client_pub = PrivateKey(CLIENT_PRIV).public_key
        self._server_info = ServerInfo(
            seal_server_info(SERVER_PRIV, bytes(client_pub), {"version": 2}, NONCE)
        ).encode()
        self._box = Box(PrivateKey(SERVER_PRIV), client_pub)
        self._rng = random.Random(5)

    def run(self, data: bytes) -> str:
        d = Data(data)
        state = d.byte() & 3
        split = d.byte()
        rng = self._rng
        conn = DerpClientConn(CLIENT_PRIV, randbytes=rng.randbytes, mesh_key=None)
        conn.connection_made(0.0)
        stream = d.rest()
        if state == 3:
            sealed = NONCE + bytes(self._box.encrypt(stream, NONCE))[NONCE_LEN:]
            stream = ServerInfo(sealed).encode() if len(sealed) < 1 << 20 else b""
            state = 1
        if state >= 1:
            conn.receive_data(_SERVER_KEY, 0.0)
        if state == 2:
            conn.receive_data(self._server_info, 0.0)
            check(conn.state is ClientState.CONNECTED, "golden login failed")
        conn.data_to_send()
        conn.events()
        for i, piece in enumerate(Data(bytes([split])).stream_split(stream)):
            try:
                conn.receive_data(piece, float(i))
            except RemoteProtocolError as exc:
                check(conn.state is ClientState.CLOSED, "error without closing")
                check(isinstance(conn.events()[-1], Closed), "no Closed event")
                conn.receive_data(b"\x06\x00\x00\x00\x00", 1.0)  # ignored once closed
                return tag(exc)
            conn.data_to_send()
            conn.events()
        conn.on_timer(1000.0)
        return f"ok:{conn.state.name}"

    def seeds(self) -> list[bytes]:
        frames = golden_frames()
        steady = b"".join(frames[3:])
        return [
            Seed().byte(0).byte(0).raw(frames[0] + frames[2]).build(),
            Seed().byte(1).byte(3).raw(frames[2] + steady).build(),
            Seed().byte(2).byte(0).raw(steady).build(),
            Seed().byte(2).byte(1).raw(steady).build(),
            Seed().byte(3).byte(0).raw(b'{"version":2}').build(),
        ]
