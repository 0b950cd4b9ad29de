"""Joining: the coordinator's key, the sealed register request and answer, and updates.

A node reads `ServerKey`, seals a `RegisterRequest` to it (`SealedRequest`) and gets back a
sealed `Registration` (`SealedResponse`); later it sends its whole current state as an
`UpdateRequest`. Every 4xx/5xx answer is an `ErrorBody`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any, Self

from nacl.public import Box, PrivateKey, PublicKey

from agent.keys import DiscoPublic, NodePrivate, NodePublic
from agent.proto.coordinator_messages.fields import (
    BadMessage,
    Endpoint,
    dump_object,
    load_object,
    read_disco_key,
    read_endpoints,
    read_ip,
    read_node_key,
    read_number,
    read_region,
    read_str,
)
from agent.proto.coordinator_messages.netmap import (
    NodeInfo,
    derp_from_json,
    derp_to_json,
    interface_addresses,
)
from agent.proto.derpmap import DerpConfig
from agent.proto.endpoint import format_endpoint

__all__ = [
    "ErrorBody",
    "ServerKey",
    "SealedRequest",
    "SealedResponse",
    "RegisterRequest",
    "UpdateRequest",
    "Registration",
    "seal",
    "unseal",
]


def seal(private: NodePrivate, public: bytes, plaintext: bytes, nonce: bytes) -> bytes:
    """A NaCl box (X25519, XSalsa20-Poly1305) from `private` to the key `public`."""
    box = Box(PrivateKey(private.raw), PublicKey(public))
    return bytes(box.encrypt(plaintext, nonce).ciphertext)


def unseal(private: NodePrivate, public: bytes, nonce: bytes, sealed: bytes) -> bytes:
    """Open a box; nacl CryptoError when it was not sealed between these two keys."""
    return bytes(Box(PrivateKey(private.raw), PublicKey(public)).decrypt(sealed, nonce))


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every 4xx/5xx answer: `{"error": CODE, "message": TEXT}` (the codes are listed in
    agent/coordinator's package docstring)."""

    error: str
    message: str

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        return cls(error=read_str(doc, "error"), message=str(doc.get("message", "")))

    def encode(self) -> bytes:
        return dump_object({"error": self.error, "message": self.message})


@dataclass(frozen=True, slots=True)
class ServerKey:
    """`GET /api/v1/key`: the coordinator's X25519 public key and its clock (the register
    timestamp is taken from this clock, so the node's own clock never matters)."""

    public_key: NodePublic
    time: float

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        return cls(public_key=read_node_key(doc, "public_key"), time=read_number(doc, "time"))

    def encode(self) -> bytes:
        return dump_object({"public_key": self.public_key.to_b64(), "time": self.time})


def _nonce_and_box(doc: dict[str, Any]) -> tuple[bytes, bytes]:
    """The base64 `nonce` (24 bytes) and `sealed` fields of a sealed message."""
    try:
        nonce = base64.b64decode(read_str(doc, "nonce"), validate=True)
        sealed = base64.b64decode(read_str(doc, "sealed"), validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise BadMessage("nonce/sealed: not base64") from None
    if len(nonce) != 24:
        raise BadMessage("nonce: expected 24 bytes")
    return nonce, sealed


@dataclass(frozen=True, slots=True)
class SealedRequest:
    """`POST /api/v1/register` body: a RegisterRequest sealed in a NaCl box from the node key to
    the coordinator key; opening it proves the sender holds the node's private key."""

    node_key: NodePublic
    nonce: bytes  # 24 bytes
    sealed: bytes

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        nonce, sealed = _nonce_and_box(doc)
        return cls(node_key=read_node_key(doc, "node_key"), nonce=nonce, sealed=sealed)

    def encode(self) -> bytes:
        return dump_object(
            {
                "node_key": self.node_key.to_b64(),
                "nonce": base64.b64encode(self.nonce).decode(),
                "sealed": base64.b64encode(self.sealed).decode(),
            }
        )


@dataclass(frozen=True, slots=True)
class SealedResponse:
    """The register answer (200): a Registration sealed from the coordinator key to the node."""

    nonce: bytes
    sealed: bytes

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        nonce, sealed = _nonce_and_box(doc)
        return cls(nonce=nonce, sealed=sealed)

    def encode(self) -> bytes:
        return dump_object(
            {
                "nonce": base64.b64encode(self.nonce).decode(),
                "sealed": base64.b64encode(self.sealed).decode(),
            }
        )


def _hostname(doc: Mapping[str, Any], key: str) -> str:
    name = read_str(doc, key)
    if not name or len(name) > 255:
        raise BadMessage(f"{key}: expected 1..255 characters")
    return name


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """What a node sends (sealed) to join or to come back: `auth_key` may be "" when the node key
    is already registered and not expired."""

    auth_key: str
    disco_key: DiscoPublic
    hostname: str
    endpoints: tuple[Endpoint, ...]
    home_region: int | None
    timestamp: float  # the coordinator's clock (ServerKey.time) plus the time since reading it

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        return cls(
            auth_key=read_str(doc, "auth_key"),
            disco_key=read_disco_key(doc, "disco_key"),
            hostname=_hostname(doc, "hostname"),
            endpoints=read_endpoints(doc, "endpoints"),
            home_region=read_region(doc, "home_region"),
            timestamp=read_number(doc, "timestamp"),
        )

    def encode(self) -> bytes:
        return dump_object(
            {
                "auth_key": self.auth_key,
                "disco_key": self.disco_key.to_b64(),
                "hostname": self.hostname,
                "endpoints": [format_endpoint(e) for e in self.endpoints],
                "home_region": self.home_region,
                "timestamp": self.timestamp,
            }
        )


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """`POST /api/v1/update`: the node's current endpoints, home region and disco key (the whole
    state each time, so an update is idempotent and a lost one is repaired by the next)."""

    disco_key: DiscoPublic
    endpoints: tuple[Endpoint, ...]
    home_region: int | None

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        return cls(
            disco_key=read_disco_key(doc, "disco_key"),
            endpoints=read_endpoints(doc, "endpoints"),
            home_region=read_region(doc, "home_region"),
        )

    def encode(self) -> bytes:
        return dump_object(
            {
                "disco_key": self.disco_key.to_b64(),
                "endpoints": [format_endpoint(e) for e in self.endpoints],
                "home_region": self.home_region,
            }
        )


@dataclass(frozen=True, slots=True)
class Registration:
    """The register answer (sealed): the node as registered, its bearer token for the other
    endpoints, the overlay ranges (the node's interface prefixes) and the DERP map."""

    node: NodeInfo
    token: str
    ipv4_range: IPv4Network
    ipv6_range: IPv6Network
    derp: DerpConfig

    def addresses(self) -> tuple[IPv4Interface, IPv6Interface]:
        """The node's own interface addresses, with the overlay ranges as prefixes."""
        return interface_addresses(self.node, self.ipv4_range, self.ipv6_range)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        return cls(
            node=NodeInfo.from_json(doc.get("node"), "node"),
            token=read_str(doc, "token"),
            ipv4_range=read_ip(doc, "ipv4_range", IPv4Network),
            ipv6_range=read_ip(doc, "ipv6_range", IPv6Network),
            derp=derp_from_json(doc.get("derp")),
        )

    def encode(self) -> bytes:
        return dump_object(
            {
                "node": self.node.to_json(),
                "token": self.token,
                "ipv4_range": str(self.ipv4_range),
                "ipv6_range": str(self.ipv6_range),
                "derp": derp_to_json(self.derp),
            }
        )

    def __repr__(self) -> str:  # the token is a secret
        return f"Registration(node={self.node.name!r}, id={self.node.id})"
