"""DERP frame codec: FrameBuffer over a chunked stream, parse_any, parse_frame, and the JSON
inside ClientInfo/ServerInfo boxes.

Contract (agent/proto/derp/frames/): receive paths raise only RemoteProtocolError subclasses
(MalformedPacket, FrameTooLarge, AuthenticationFailed); once a FrameBuffer failed, every later
feed raises too. Invariants: a parsed frame re-encodes to bytes that parse to the same frame;
FrameBuffer never holds more than one header plus one allowed payload.

Input: mode byte, then
    0  stream split byte, max-frame-size selector byte, stream bytes (FrameBuffer.feed)
    1  one whole frame (parse_any)
    2  the JSON plaintext of a ClientInfo box sealed by a real client key (open_client_info)
    3  the same for ServerInfo (open_server_info)
"""

from __future__ import annotations

from nacl.public import Box, PrivateKey

from agent.proto.derp.frames import (
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAX_FRAME_SIZE,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    FrameBuffer,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    UnknownFrame,
    WatchConns,
    max_payload_len,
    open_client_info,
    open_server_info,
    parse_any,
    seal_client_info,
    seal_server_info,
)
from agent.proto.errors import RemoteProtocolError
from fuzz.common import Data, Seed, check, tag

SERVER_PRIV = bytes.fromhex("11" * 32)
CLIENT_PRIV = bytes.fromhex("22" * 32)
SERVER_PUB = bytes(PrivateKey(SERVER_PRIV).public_key)
CLIENT_PUB = bytes(PrivateKey(CLIENT_PRIV).public_key)
PEER_PUB = bytes(range(1, 33))
NONCE = bytes(range(24))
_FRAME_SIZES = (MAX_FRAME_SIZE, 0, 64, 1 << 16)


def golden_frames() -> list[bytes]:
    """One encoded frame of every known type (values like the golden tests')."""
    return [
        ServerKey(SERVER_PUB).encode(),
        ClientInfo(
            CLIENT_PUB,
            seal_client_info(CLIENT_PRIV, SERVER_PUB, {"version": 2, "CanAckPings": True}, NONCE),
        ).encode(),
        ServerInfo(seal_server_info(SERVER_PRIV, CLIENT_PUB, {"version": 2}, NONCE)).encode(),
        SendPacket(PEER_PUB, b"\x01\x02\x03").encode(),
        RecvPacket(CLIENT_PUB, b"\x01\x02\x03").encode(),
        KeepAlive().encode(),
        NotePreferred(True).encode(),
        PeerGone(PEER_PUB, PeerGoneReason.NOT_HERE).encode(),
        PeerPresent(PEER_PUB).encode(),
        ForwardPacket(CLIENT_PUB, PEER_PUB, b"\x01\x02\x03").encode(),
        WatchConns().encode(),
        ClosePeer(PEER_PUB).encode(),
        Ping(bytes(range(1, 9))).encode(),
        Pong(bytes(range(1, 9))).encode(),
        Health("degraded").encode(),
        Restarting(1000, 5000).encode(),
        UnknownFrame(0x40, b"future").encode(),
    ]


def _roundtrip(frame: object) -> None:
    enc = frame.encode()  # type: ignore[attr-defined]
    check(parse_any(enc) == frame, f"{type(frame).__name__} does not survive encode/parse")


class Harness:
    name = "derp_frames"
    contract = "RemoteProtocolError (MalformedPacket, FrameTooLarge, AuthenticationFailed)"
    dictionary = (b"DERP\xf0\x9f\x94\x91", b'{"version":2}', b"{", b"[", b'"meshKey"',
                  b"\x00\x00\x00\x20", b"\x04\x00\x00\x00\x23")  # fmt: skip

    def __init__(self) -> None:
        self._client_box = Box(PrivateKey(CLIENT_PRIV), PrivateKey(SERVER_PRIV).public_key)
        self._server_box = Box(PrivateKey(SERVER_PRIV), PrivateKey(CLIENT_PRIV).public_key)

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() & 3
        if mode == 0:
            return self._stream(d)
        if mode == 1:
            try:
                frame = parse_any(d.rest())
            except RemoteProtocolError as exc:
                return tag(exc)
            _roundtrip(frame)
            return type(frame).__name__
        plain = d.rest()
        box = self._client_box if mode == 2 else self._server_box
        sealed = bytes(box.encrypt(plain, NONCE))
        try:
            if mode == 2:
                info = open_client_info(SERVER_PRIV, CLIENT_PUB, sealed)
            else:
                info = open_server_info(CLIENT_PRIV, SERVER_PUB, sealed)
        except RemoteProtocolError as exc:
            return f"{mode}:{tag(exc)}"
        check(isinstance(info, dict), "box JSON is not a dict")
        return f"{mode}:ok"

    def _stream(self, d: Data) -> str:
        limit = _FRAME_SIZES[d.byte() & 3]
        split = d.byte()
        stream = d.rest()
        fb = FrameBuffer(limit)
        pieces = Data(bytes([split])).stream_split(stream)
        frames = 0
        for piece in pieces:
            try:
                got = fb.feed(piece)
            except RemoteProtocolError as exc:
                check(fb.failed, "error raised but the buffer is not failed")
                try:
                    fb.feed(b"x")
                except RemoteProtocolError:
                    pass
                else:
                    raise AssertionError("a failed FrameBuffer accepted more bytes") from exc
                return tag(exc)
            for frame in got:
                frames += 1
                if not isinstance(frame, UnknownFrame) or frame.frame_type > 0x15:
                    _roundtrip(frame)
            cap = max_payload_len(0x03) or 0
            check(fb.buffered <= FRAME_HEADER_LEN + min(limit, cap), "FrameBuffer holds too much")
        return f"stream:{frames}:{fb.buffered > 0}"

    def seeds(self) -> list[bytes]:
        frames = golden_frames()
        out = [Seed().byte(0).byte(0).byte(0).raw(b"".join(frames)).build()]
        out.append(Seed().byte(0).byte(0).byte(7).raw(b"".join(frames[3:9])).build())
        out += [Seed().byte(1).raw(f).build() for f in frames]
        out.append(Seed().byte(2).raw(b'{"version":2,"CanAckPings":true}').build())
        out.append(Seed().byte(2).raw(b'{"version":2,"meshKey":"' + b"ab" * 32 + b'"}').build())
        out.append(Seed().byte(3).raw(b'{"version":2}').build())
        out.append(
            Seed().byte(0).byte(2).byte(1).raw(b"\x04\x00\x01\x00\x00" + KEY_LEN * b"k").build()
        )
        return out
