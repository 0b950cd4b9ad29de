"""DERP frame codec (tailscale derp/derp.go; the login in derp/derp_client.go and derpserver).

Flow after the HTTP upgrade (C = client, S = relay server, M = mesh-key holders only):

    S -> C  ServerKey      magic + server key; always the first frame
    C -> S  ClientInfo     client key + box(client priv -> server pub, JSON)
    S -> C  ServerInfo     box(server priv -> client pub, JSON); the frame right after ServerKey
    C -> S  NotePreferred  (home region only), WatchConns (mesh watchers only)
    steady  SendPacket -> RecvPacket, KeepAlive, Ping/Pong, PeerGone, PeerPresent (M),
            ForwardPacket (M), ClosePeer (M), Health, Restarting; unknown types are skipped

Every frame is a 5-byte header and a payload; integers are big-endian:

    +--------+----------------------+------------------------+
    | type   | length (u32 BE)      | payload (length bytes) |
    | 1 byte | 4 bytes              |                        |
    +--------+----------------------+------------------------+

Payloads (as derp.go documents each frame type; "key" = 32-byte raw Curve25519 public key):

    0x01 ServerKey      magic(8) | server key(32) | [future bytes]      40..1024
    0x02 ClientInfo     client key(32) | nonce(24) | box(JSON)          56..256 KiB
    0x03 ServerInfo     nonce(24) | box(JSON)                           24..24 + 1 MiB
    0x04 SendPacket     dst key(32) | packet(<= 64 KiB)
    0x05 RecvPacket     src key(32) | packet(<= 64 KiB)
    0x06 KeepAlive      empty
    0x07 NotePreferred  1 byte: 0x01 home region, 0x00 not
    0x08 PeerGone       key(32) | [reason(1)]                           32, or 33+
    0x09 PeerPresent    key(32) | [ip(16) | port(2) | [flags(1)]]       32, 50 or 51+
    0x0a ForwardPacket  src key(32) | dst key(32) | packet(<= 64 KiB)
    0x10 WatchConns     empty
    0x11 ClosePeer      key(32)
    0x12 Ping           data(8) | [ignored, up to 1000 in all]
    0x13 Pong           data(8) | [ignored, up to 1000 in all]
    0x14 Health         UTF-8 text; empty means healthy again
    0x15 Restarting     reconnect_in ms(u32) | try_for ms(u32) | [future bytes]

Modules: `header` (type bytes, limits, header helpers), one per frame group (`login` with the
NaCl boxes, `packets`, `peers`, `control`), and `stream` (the `Frame` union, `parse_frame`,
`parse_any` and the streaming `FrameBuffer`). Receive paths raise only RemoteProtocolError
subclasses: MalformedPacket, FrameTooLarge, AuthenticationFailed.
"""

from agent.proto.derp.frames.control import (
    Health,
    KeepAlive,
    Ping,
    Pong,
    Restarting,
    UnknownFrame,
)
from agent.proto.derp.frames.header import (
    BOX_OVERHEAD,
    CLIENT_READ_TIMEOUT,
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    KEY_LEN,
    MAGIC,
    MAX_CLIENT_INFO_LEN,
    MAX_FRAME_SIZE,
    MAX_INFO_LEN,
    MAX_PACKET_SIZE,
    MAX_PING_LEN,
    MAX_SERVER_KEY_LEN,
    MAX_WRITTEN_FRAME_SIZE,
    NONCE_LEN,
    PROTOCOL_VERSION,
    FrameTooLarge,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    max_payload_len,
)
from agent.proto.derp.frames.login import (
    ClientInfo,
    ServerInfo,
    ServerKey,
    open_client_info,
    open_server_info,
    seal_client_info,
    seal_server_info,
)
from agent.proto.derp.frames.packets import (
    ForwardPacket,
    RecvPacket,
    SendPacket,
)
from agent.proto.derp.frames.peers import (
    ClosePeer,
    NotePreferred,
    PeerGone,
    PeerPresent,
    WatchConns,
)
from agent.proto.derp.frames.stream import (
    Frame,
    FrameBuffer,
    parse_any,
    parse_frame,
)

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "KEY_LEN", "NONCE_LEN", "BOX_OVERHEAD", "FRAME_HEADER_LEN",
    "MAX_PACKET_SIZE", "MAX_INFO_LEN", "MAX_FRAME_SIZE", "MAX_WRITTEN_FRAME_SIZE",
    "MAX_CLIENT_INFO_LEN", "MAX_SERVER_KEY_LEN", "MAX_PING_LEN", "KEEPALIVE_INTERVAL",
    "KEEPALIVE_JITTER", "CLIENT_READ_TIMEOUT", "FRAME_HEADER",
    "FrameType", "PeerGoneReason", "PeerPresentFlags", "FrameTooLarge",
    "ServerKey", "ClientInfo", "ServerInfo", "SendPacket", "RecvPacket", "KeepAlive",
    "NotePreferred", "PeerGone", "PeerPresent", "ForwardPacket", "WatchConns", "ClosePeer",
    "Ping", "Pong", "Health", "Restarting", "UnknownFrame", "Frame",
    "seal_client_info", "open_client_info", "seal_server_info", "open_server_info",
    "max_payload_len", "parse_frame", "parse_any", "FrameBuffer",
]  # fmt: skip
