"""DISCO path-discovery codec (Tailscale-compatible), sans-I/O.

Follows tailscale's disco/disco.go (packet, NaCl box crypto, messages) and
wgengine/magicsock/magicsock.go (classifying a datagram); vectors from disco/disco_test.go.

Flow (nodes A and B, each with a disco key pair distributed through the netmap):

    A -> B  Ping          over UDP to each candidate endpoint, and over DERP
    B -> A  Pong          to the exact source of the Ping; `src` = where B saw it come from
                          (127.3.3.40:<region> when the Ping came over DERP)
    A -> B  CallMeMaybe   over DERP only: A's endpoints, so B pings them too (hole punching)

Packet, identical over UDP and as a DERP SendPacket/RecvPacket payload:
     0   magic            6    "TS💬" = 54 53 f0 9f 92 ac
     6   sender disco key 32   sender's disco public key, raw
    38   nonce            24   random per packet
    62   box              16-byte Poly1305 tag || XSalsa20(plaintext), NaCl crypto_box keyed by
                               X25519(own disco private, peer disco public)

Plaintext: type u8 | version u8 (always 0 when sent) | body; trailing bytes are ignored.
    0x01 Ping         tx_id 12 | [sender node key 32] | [zero padding]      body >= 12
    0x02 Pong         tx_id 12 | src IP 16 (IPv4 as ::ffff:a.b.c.d) | port u16 BE   body >= 30
    0x03 CallMeMaybe  N x (IP 16 | port u16 BE); empty unless version 0 and length a
                      positive multiple of 18
    0x80 NatInfo      flags u8 (ours, not tailscale's; DERP only, sent beside CallMeMaybe):
                      0x01 hard: the sender's NAT maps per destination (netcheck
                      MappingVariesByDestIP), 0x02 easy: it does not (neither: unknown),
                      0x04 want: the sender has traffic for us and no direct path,
                      0x08 probe: the sender (hard) holds sockets mapped towards us now and
                      asks us to guess its ports (engine/birthday.py); other bits ignored

Types 4-9 (peer relays) are not implemented: parsing them raises MalformedPacket, which the
receiver drops like any packet it cannot understand. A receiver that predates NatInfo drops it
the same way, so sending it costs an older peer one counted drop and changes nothing else. Pure
computation; receive paths raise only RemoteProtocolError subclasses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias

import nacl.exceptions
import nacl.public

from agent.proto.errors import AuthenticationFailed, LocalProtocolError, MalformedPacket

__all__ = [
    "MAGIC",
    "KEY_LEN",
    "NONCE_LEN",
    "BOX_OVERHEAD",
    "HEADER_LEN",
    "MIN_LOOKS_LIKE_LEN",
    "MIN_PACKET_LEN",
    "MESSAGE_HEADER_LEN",
    "TYPE_PING",
    "TYPE_PONG",
    "TYPE_CALL_ME_MAYBE",
    "TYPE_NAT_INFO",
    "VERSION",
    "TX_ID_LEN",
    "ENDPOINT_LEN",
    "PING_LEN",
    "PING_WITH_KEY_LEN",
    "PONG_LEN",
    "DERP_MAGIC_IP",
    "Address",
    "Ping",
    "Pong",
    "CallMeMaybe",
    "NatInfo",
    "Message",
    "parse_message",
    "looks_like_disco",
    "sender_key",
    "shared_key",
    "seal",
    "open_packet",
]

Address: TypeAlias = tuple[str, int]

MAGIC: Final = "TS💬".encode()  # 54 53 f0 9f 92 ac
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
BOX_OVERHEAD: Final = 16  # Poly1305 tag
HEADER_LEN: Final = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62
MIN_LOOKS_LIKE_LEN: Final = len(MAGIC) + KEY_LEN  # 38, magicsock's discoHeaderLen
MESSAGE_HEADER_LEN: Final = 2  # type, version
MIN_PACKET_LEN: Final = HEADER_LEN + BOX_OVERHEAD + MESSAGE_HEADER_LEN  # 80

TYPE_PING: Final = 0x01
TYPE_PONG: Final = 0x02
TYPE_CALL_ME_MAYBE: Final = 0x03
TYPE_NAT_INFO: Final = 0x80  # ours: above the types tailscale defines (1-9)
VERSION: Final = 0  # every message type is sent as version 0

TX_ID_LEN: Final = 12
ENDPOINT_LEN: Final = 18  # IPv6 or IPv4-mapped address 16 | port u16 BE
PING_LEN: Final = TX_ID_LEN  # minimum Ping body
PING_WITH_KEY_LEN: Final = TX_ID_LEN + KEY_LEN  # 44
PONG_LEN: Final = TX_ID_LEN + ENDPOINT_LEN  # 30

DERP_MAGIC_IP: Final = "127.3.3.40"  # Pong src for a Ping that came over DERP: (ip, region ID)

_ENDPOINT: Final = struct.Struct(">16sH")


# --- address helpers ------------------------------------------------------------------------------


def _encode_endpoint(addr: Address) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {host!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return _ENDPOINT.pack(ip.packed, port)


def _decode_endpoint(data: bytes, offset: int) -> Address:
    raw, port = _ENDPOINT.unpack_from(data, offset)
    ip = ipaddress.IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return (str(mapped) if mapped is not None else str(ip)), port


def _check_header(data: bytes, msg_type: int, min_body: int) -> int:
    """The version byte, after checking the type and that at least `min_body` bytes follow."""
    if len(data) < MESSAGE_HEADER_LEN:
        raise MalformedPacket("disco message shorter than its header")
    if data[0] != msg_type:
        raise MalformedPacket(f"disco message type {data[0]} is not {msg_type}")
    if len(data) - MESSAGE_HEADER_LEN < min_body:
        raise MalformedPacket(f"disco message type {msg_type} body shorter than {min_body}")
    return data[1]


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping (type 1): tx_id, the sender's node (WireGuard) key, optional zero padding.

    `padding` pads the body for path-MTU probes; it needs a node key (without one, the zeros
    would read back as a key).
    """

    TYPE: ClassVar[int] = TYPE_PING

    tx_id: bytes
    node_key: bytes | None = None
    padding: int = 0

    def encode(self) -> bytes:
        if len(self.tx_id) != TX_ID_LEN:
            raise LocalProtocolError(f"tx_id must be {TX_ID_LEN} bytes")
        if self.node_key is None:
            if self.padding:
                raise LocalProtocolError("Ping padding needs a node key")
            return bytes((TYPE_PING, VERSION)) + self.tx_id
        if len(self.node_key) != KEY_LEN:
            raise LocalProtocolError(f"node key must be {KEY_LEN} bytes")
        if self.padding < 0:
            raise LocalProtocolError("negative padding")
        return bytes((TYPE_PING, VERSION)) + self.tx_id + self.node_key + bytes(self.padding)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _check_header(data, TYPE_PING, PING_LEN)
        body = bytes(data[MESSAGE_HEADER_LEN:])
        if len(body) < PING_WITH_KEY_LEN:
            return cls(tx_id=body[:TX_ID_LEN])
        return cls(
            tx_id=body[:TX_ID_LEN],
            node_key=body[TX_ID_LEN:PING_WITH_KEY_LEN],
            padding=len(body) - PING_WITH_KEY_LEN,
        )


@dataclass(frozen=True, slots=True)
class Pong:
    """Pong (type 2): the Ping's tx_id and the address the Ping was seen coming from."""

    TYPE: ClassVar[int] = TYPE_PONG

    tx_id: bytes
    src: Address

    def encode(self) -> bytes:
        if len(self.tx_id) != TX_ID_LEN:
            raise LocalProtocolError(f"tx_id must be {TX_ID_LEN} bytes")
        return bytes((TYPE_PONG, VERSION)) + self.tx_id + _encode_endpoint(self.src)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _check_header(data, TYPE_PONG, PONG_LEN)
        start = MESSAGE_HEADER_LEN
        tx_id = bytes(data[start : start + TX_ID_LEN])
        return cls(tx_id=tx_id, src=_decode_endpoint(data, start + TX_ID_LEN))


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """CallMeMaybe (type 3): the sender's endpoints. Valid only when received over DERP."""

    TYPE: ClassVar[int] = TYPE_CALL_ME_MAYBE

    endpoints: tuple[Address, ...] = ()

    def encode(self) -> bytes:
        body = b"".join(_encode_endpoint(ep) for ep in self.endpoints)
        return bytes((TYPE_CALL_ME_MAYBE, VERSION)) + body

    @classmethod
    def parse(cls, data: bytes) -> Self:
        version = _check_header(data, TYPE_CALL_ME_MAYBE, 0)
        body_len = len(data) - MESSAGE_HEADER_LEN
        if version != VERSION or body_len == 0 or body_len % ENDPOINT_LEN:
            return cls()
        return cls(
            endpoints=tuple(
                _decode_endpoint(data, off)
                for off in range(MESSAGE_HEADER_LEN, len(data), ENDPOINT_LEN)
            )
        )


_NAT_HARD: Final = 0x01
_NAT_EASY: Final = 0x02
_NAT_WANT: Final = 0x04
_NAT_PROBE: Final = 0x08


@dataclass(frozen=True, slots=True)
class NatInfo:
    """NatInfo (type 0x80, ours): what the sender knows of its NAT. Valid only over DERP.

    `hard`: True when its NAT gives each destination a new public port (None: not known);
    `want`: it has traffic for us and no direct path; `probe`: it (the hard side) has just
    sent from many sockets towards our endpoint and asks us to guess its ports now.
    """

    TYPE: ClassVar[int] = TYPE_NAT_INFO

    hard: bool | None = None
    want: bool = False
    probe: bool = False

    def encode(self) -> bytes:
        flags = 0 if self.hard is None else (_NAT_HARD if self.hard else _NAT_EASY)
        flags |= (_NAT_WANT if self.want else 0) | (_NAT_PROBE if self.probe else 0)
        return bytes((TYPE_NAT_INFO, VERSION, flags))

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _check_header(data, TYPE_NAT_INFO, 1)
        flags = data[MESSAGE_HEADER_LEN]
        hard = flags & (_NAT_HARD | _NAT_EASY)
        return cls(
            hard=None if hard in (0, _NAT_HARD | _NAT_EASY) else hard == _NAT_HARD,
            want=bool(flags & _NAT_WANT),
            probe=bool(flags & _NAT_PROBE),
        )


Message: TypeAlias = Ping | Pong | CallMeMaybe | NatInfo

_BY_TYPE: Final[dict[int, type[Ping] | type[Pong] | type[CallMeMaybe] | type[NatInfo]]] = {
    TYPE_PING: Ping,
    TYPE_PONG: Pong,
    TYPE_CALL_ME_MAYBE: CallMeMaybe,
    TYPE_NAT_INFO: NatInfo,
}


def parse_message(plaintext: bytes) -> Message:
    """Dispatch a decrypted disco payload on its type byte; unknown types are MalformedPacket."""
    if len(plaintext) < MESSAGE_HEADER_LEN:
        raise MalformedPacket("disco message shorter than its header")
    cls = _BY_TYPE.get(plaintext[0])
    if cls is None:
        raise MalformedPacket(f"unknown disco message type {plaintext[0]}")
    return cls.parse(plaintext)


# --- packets --------------------------------------------------------------------------------------


def looks_like_disco(packet: bytes) -> bool:
    """At least magic + sender key, starting with the disco magic (as tailscale
    wgengine/magicsock/magicsock.go packetLooksLike tests it; over UDP and over DERP)."""
    return len(packet) >= MIN_LOOKS_LIKE_LEN and packet[: len(MAGIC)] == MAGIC


def sender_key(packet: bytes) -> bytes:
    """The sender disco public key of a packet, read before opening it (only packets from
    known peers' disco keys are worth opening, as magicsock.go handleDiscoMessage does)."""
    if not looks_like_disco(packet):
        raise MalformedPacket("not a disco packet")
    return bytes(packet[len(MAGIC) : MIN_LOOKS_LIKE_LEN])


def _box(private: bytes, public: bytes) -> nacl.public.Box:
    if len(private) != KEY_LEN or len(public) != KEY_LEN:
        raise LocalProtocolError(f"disco keys must be {KEY_LEN} bytes")
    return nacl.public.Box(nacl.public.PrivateKey(private), nacl.public.PublicKey(public))


def shared_key(private: bytes, public: bytes) -> bytes:
    """crypto_box_beforenm(public, private): the key both directions of a disco pair use
    (tailscale types/key/disco.go Shared).

    Raises LocalProtocolError for a low-order `public` (X25519 gives all zeros).
    """
    try:
        return bytes(_box(private, public).shared_key())
    except nacl.exceptions.CryptoError as exc:
        raise LocalProtocolError("unusable disco key pair") from exc


def seal(
    sender_disco_private: bytes, receiver_disco_public: bytes, message: Message, nonce: bytes
) -> bytes:
    """The full packet: magic || sender disco public || nonce || box(message.encode()).

    `nonce` must be 24 fresh random bytes (from the caller's injected randbytes). Raises
    LocalProtocolError for keys of the wrong size or a low-order `receiver_disco_public`.
    """
    if len(nonce) != NONCE_LEN:
        raise LocalProtocolError(f"nonce must be {NONCE_LEN} bytes")
    plaintext = message.encode()
    try:
        box = _box(sender_disco_private, receiver_disco_public)
        sealed = box.encrypt(plaintext, nonce)
    except nacl.exceptions.CryptoError as exc:
        raise LocalProtocolError("unusable disco key pair") from exc
    sender_public = bytes(nacl.public.PrivateKey(sender_disco_private).public_key)
    return MAGIC + sender_public + bytes(sealed)  # sealed = nonce || tag || ciphertext


def open_packet(receiver_disco_private: bytes, packet: bytes) -> tuple[bytes, Message]:
    """(sender disco public, message) of a disco packet addressed to us.

    MalformedPacket for a packet too short or without the magic and for a plaintext that does not
    parse; AuthenticationFailed when the box does not open (wrong key, tampering, low-order key).
    """
    if len(receiver_disco_private) != KEY_LEN:
        raise LocalProtocolError(f"disco private key must be {KEY_LEN} bytes")
    if len(packet) < MIN_PACKET_LEN or packet[: len(MAGIC)] != MAGIC:
        raise MalformedPacket("not a disco packet")
    sender = bytes(packet[len(MAGIC) : MIN_LOOKS_LIKE_LEN])
    nonce = bytes(packet[MIN_LOOKS_LIKE_LEN:HEADER_LEN])
    try:
        box = nacl.public.Box(
            nacl.public.PrivateKey(receiver_disco_private), nacl.public.PublicKey(sender)
        )
        plaintext = box.decrypt(bytes(packet[HEADER_LEN:]), nonce)
    except nacl.exceptions.CryptoError as exc:
        raise AuthenticationFailed("disco box did not open") from exc
    return sender, parse_message(plaintext)
