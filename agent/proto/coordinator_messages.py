"""The coordinator's wire messages: JSON bodies as frozen dataclasses with `parse`/`encode`.

Every body is one UTF-8 JSON object (see the package docstring for which endpoint carries which).
Keys are WireGuard base64, times are unix seconds (floats), endpoints are `IP:PORT` strings
(`[V6]:PORT` for IPv6), overlay addresses are bare IP strings and the address ranges CIDR strings.
The DERP map has the shape of the agent config's `[derp]` table (`regions`, each with `id`,
`code` and `nodes` of `host`, `port`, `stun_port`, `ca_file`, `insecure_skip_verify`) and parses
into `agent.proto.derpmap.DerpConfig`, so the daemon handles static and coordinated DERP maps alike.

`parse` raises only `BadMessage` (a `MalformedPacket`, so a `RemoteProtocolError`) naming the
field at fault; `encode` trusts its own fields. Unknown keys are ignored (newer peers may add
some); missing or mistyped ones are errors.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Final, Self

from nacl.public import Box, PrivateKey, PublicKey

from agent.keys import DiscoPublic, KeyError_, NodePrivate, NodePublic
from agent.proto.derpmap import DerpConfig, DerpNode, DerpRegion
from agent.proto.endpoint import format_endpoint, parse_endpoint
from agent.proto.errors import MalformedPacket

__all__ = [
    "API",
    "LONG_POLL",
    "MAX_BODY",
    "MAX_ENDPOINTS",
    "MAX_HOSTNAME",
    "BadMessage",
    "Endpoint",
    "NodeInfo",
    "NetMap",
    "ServerKey",
    "RegisterRequest",
    "SealedRequest",
    "SealedResponse",
    "Registration",
    "UpdateRequest",
    "ErrorBody",
    "format_endpoint",
    "parse_endpoint",
    "derp_to_json",
    "derp_from_json",
    "seal",
    "unseal",
]

API: Final = "/api/v1"
LONG_POLL: Final = 25.0  # a netmap request with nothing new is answered after this many seconds
MAX_BODY: Final = 64 << 10  # a request body; netmaps (responses) may be larger
MAX_ENDPOINTS: Final = 32
MAX_HOSTNAME: Final = 63
MAX_REGION: Final = 2**31 - 1

Endpoint = tuple[str, int]  # literal IP (no brackets), port: as agent.config.PeerConfig.endpoint


class BadMessage(MalformedPacket):
    """A coordinator message is not valid JSON of the expected shape; the text names the field."""


# -- field readers ---------------------------------------------------------------------------------


def _load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # Recursion: nested too deep
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("expected a JSON object")
    return doc


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str = "") -> Any:
    where = f"{path}.{key}" if path else key
    if key not in doc:
        raise BadMessage(f"{where}: missing")
    v = doc[key]
    if isinstance(v, bool) and kind in (int, float, (int, float)):
        raise BadMessage(f"{where}: expected a number, got a boolean")
    if not isinstance(v, kind):
        raise BadMessage(f"{where}: expected {_kind_name(kind)}, got {type(v).__name__}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _opt_int(doc: Mapping[str, Any], key: str, path: str = "") -> int | None:
    if doc.get(key) is None:
        return None
    v: int = _field(doc, key, int, path)
    return v


def _number(doc: Mapping[str, Any], key: str, path: str = "") -> float:
    v = _field(doc, key, (int, float), path)
    try:
        number = float(v)
    except OverflowError:  # an integer literal beyond a float
        number = math.inf
    if not math.isfinite(number):  # NaN passed every comparison (and SQLite stores it as NULL)
        raise BadMessage(f"{path + '.' if path else ''}{key}: not a finite number")
    return number


def _opt_number(doc: Mapping[str, Any], key: str, path: str = "") -> float | None:
    return None if doc.get(key) is None else _number(doc, key, path)


def _str(doc: Mapping[str, Any], key: str, path: str = "") -> str:
    v: str = _field(doc, key, str, path)
    return v


def _node_key(doc: Mapping[str, Any], key: str, path: str = "") -> NodePublic:
    try:
        return NodePublic.from_b64(_str(doc, key, path))
    except KeyError_ as e:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {e}") from None


def _disco_key(doc: Mapping[str, Any], key: str, path: str = "") -> DiscoPublic:
    try:
        return DiscoPublic.from_b64(_str(doc, key, path))
    except KeyError_ as e:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {e}") from None


def _region(doc: Mapping[str, Any], key: str, path: str = "") -> int | None:
    v = _opt_int(doc, key, path)
    if v is not None and not 1 <= v <= MAX_REGION:
        raise BadMessage(f"{path + '.' if path else ''}{key}: region {v} out of range")
    return v


def _endpoints(doc: Mapping[str, Any], key: str, path: str = "") -> tuple[Endpoint, ...]:
    where = f"{path}.{key}" if path else key
    items = _field(doc, key, list, path)
    if len(items) > MAX_ENDPOINTS:
        raise BadMessage(f"{where}: more than {MAX_ENDPOINTS} endpoints")
    out: list[Endpoint] = []
    for i, v in enumerate(items):
        if not isinstance(v, str):
            raise BadMessage(f"{where}[{i}]: expected a string")
        try:
            ep = parse_endpoint(v)
        except ValueError as e:
            raise BadMessage(f"{where}[{i}]: {e}") from None
        if ep not in out:
            out.append(ep)
    return tuple(out)


def _ip(doc: Mapping[str, Any], key: str, cls: type[Any], path: str = "") -> Any:
    text = _str(doc, key, path)
    try:
        return cls(text)
    except ValueError:
        raise BadMessage(f"{path + '.' if path else ''}{key}: {text!r} is not valid") from None


def seal(private: NodePrivate, public: bytes, plaintext: bytes, nonce: bytes) -> bytes:
    """A NaCl box (X25519, XSalsa20-Poly1305) from `private` to the key `public`."""
    box = Box(PrivateKey(private.raw), PublicKey(public))
    return bytes(box.encrypt(plaintext, nonce).ciphertext)


def unseal(private: NodePrivate, public: bytes, nonce: bytes, sealed: bytes) -> bytes:
    """Open a box; nacl CryptoError when it was not sealed between these two keys."""
    return bytes(Box(PrivateKey(private.raw), PublicKey(public)).decrypt(sealed, nonce))


# -- the DERP map ----------------------------------------------------------------------------------


def derp_to_json(derp: DerpConfig) -> dict[str, Any]:
    return {
        "regions": [
            {
                "id": r.id,
                "code": r.code,
                "nodes": [
                    {
                        "host": n.host,
                        "port": n.port,
                        "stun_port": n.stun_port,
                        "ca_file": n.ca_file,
                        "insecure_skip_verify": n.insecure_skip_verify,
                    }
                    for n in r.nodes
                ],
            }
            for r in derp.regions
        ]
    }


def derp_from_json(doc: object, path: str = "derp") -> DerpConfig:
    if not isinstance(doc, dict):
        raise BadMessage(f"{path}: expected an object")
    regions: list[DerpRegion] = []
    for i, r in enumerate(_field(doc, "regions", list, path)):
        rp = f"{path}.regions[{i}]"
        if not isinstance(r, dict):
            raise BadMessage(f"{rp}: expected an object")
        rid = _region(r, "id", rp)
        if rid is None:
            raise BadMessage(f"{rp}.id: missing")
        nodes: list[DerpNode] = []
        for j, n in enumerate(_field(r, "nodes", list, rp)):
            np_ = f"{rp}.nodes[{j}]"
            if not isinstance(n, dict):
                raise BadMessage(f"{np_}: expected an object")
            port, stun_port = _field(n, "port", int, np_), _field(n, "stun_port", int, np_)
            if not 1 <= port <= 65535 or not 0 <= stun_port <= 65535:
                raise BadMessage(f"{np_}: port out of range")
            ca_file = n.get("ca_file")
            if ca_file is not None and not isinstance(ca_file, str):
                raise BadMessage(f"{np_}.ca_file: expected a string or null")
            nodes.append(
                DerpNode(
                    host=_str(n, "host", np_),
                    port=port,
                    stun_port=stun_port,
                    ca_file=ca_file,
                    insecure_skip_verify=bool(n.get("insecure_skip_verify", False)),
                )
            )
        regions.append(DerpRegion(id=rid, code=_str(r, "code", rp), nodes=tuple(nodes)))
    return DerpConfig(regions=tuple(regions))


# -- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every 4xx/5xx answer: `{"error": CODE, "message": TEXT}` (codes: package docstring)."""

    error: str
    message: str

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = _load(data)
        return cls(error=_str(doc, "error"), message=str(doc.get("message", "")))

    def encode(self) -> bytes:
        return _dump({"error": self.error, "message": self.message})


@dataclass(frozen=True, slots=True)
class ServerKey:
    """`GET /api/v1/key`: the coordinator's X25519 public key and its clock (the register
    timestamp is taken from this clock, so the node's own clock never matters)."""

    public_key: NodePublic
    time: float

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = _load(data)
        return cls(public_key=_node_key(doc, "public_key"), time=_number(doc, "time"))

    def encode(self) -> bytes:
        return _dump({"public_key": self.public_key.to_b64(), "time": self.time})


def _nonce_and_box(doc: dict[str, Any]) -> tuple[bytes, bytes]:
    """The base64 `nonce` (24 bytes) and `sealed` fields of a sealed message."""
    try:
        nonce = base64.b64decode(_str(doc, "nonce"), validate=True)
        sealed = base64.b64decode(_str(doc, "sealed"), validate=True)
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
        doc = _load(data)
        nonce, sealed = _nonce_and_box(doc)
        return cls(node_key=_node_key(doc, "node_key"), nonce=nonce, sealed=sealed)

    def encode(self) -> bytes:
        return _dump(
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
        doc = _load(data)
        nonce, sealed = _nonce_and_box(doc)
        return cls(nonce=nonce, sealed=sealed)

    def encode(self) -> bytes:
        return _dump(
            {
                "nonce": base64.b64encode(self.nonce).decode(),
                "sealed": base64.b64encode(self.sealed).decode(),
            }
        )


def _hostname(doc: Mapping[str, Any], key: str) -> str:
    name = _str(doc, key)
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
        doc = _load(data)
        return cls(
            auth_key=_str(doc, "auth_key"),
            disco_key=_disco_key(doc, "disco_key"),
            hostname=_hostname(doc, "hostname"),
            endpoints=_endpoints(doc, "endpoints"),
            home_region=_region(doc, "home_region"),
            timestamp=_number(doc, "timestamp"),
        )

    def encode(self) -> bytes:
        return _dump(
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
        doc = _load(data)
        return cls(
            disco_key=_disco_key(doc, "disco_key"),
            endpoints=_endpoints(doc, "endpoints"),
            home_region=_region(doc, "home_region"),
        )

    def encode(self) -> bytes:
        return _dump(
            {
                "disco_key": self.disco_key.to_b64(),
                "endpoints": [format_endpoint(e) for e in self.endpoints],
                "home_region": self.home_region,
            }
        )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as the netmap shows it (the node itself or a peer)."""

    id: int
    name: str
    node_key: NodePublic
    disco_key: DiscoPublic
    ipv4: IPv4Address
    ipv6: IPv6Address
    endpoints: tuple[Endpoint, ...]
    home_region: int | None
    key_expiry: float | None  # unix seconds; None = never

    def allowed_ips(self) -> tuple[IPv4Network, IPv6Network]:
        """What a peer routes to this node: its two addresses as /32 and /128."""
        return IPv4Network(self.ipv4), IPv6Network(self.ipv6)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "node_key": self.node_key.to_b64(),
            "disco_key": self.disco_key.to_b64(),
            "addresses": [str(self.ipv4), str(self.ipv6)],
            "endpoints": [format_endpoint(e) for e in self.endpoints],
            "home_region": self.home_region,
            "key_expiry": self.key_expiry,
        }

    @classmethod
    def from_json(cls, doc: object, path: str) -> Self:
        if not isinstance(doc, dict):
            raise BadMessage(f"{path}: expected an object")
        addrs = _field(doc, "addresses", list, path)
        if len(addrs) != 2 or not all(isinstance(a, str) for a in addrs):
            raise BadMessage(f"{path}.addresses: expected [IPV4, IPV6]")
        try:
            ipv4, ipv6 = IPv4Address(addrs[0]), IPv6Address(addrs[1])
        except ValueError:
            raise BadMessage(f"{path}.addresses: {addrs!r} are not [IPV4, IPV6]") from None
        return cls(
            id=_field(doc, "id", int, path),
            name=_str(doc, "name", path),
            node_key=_node_key(doc, "node_key", path),
            disco_key=_disco_key(doc, "disco_key", path),
            ipv4=ipv4,
            ipv6=ipv6,
            endpoints=_endpoints(doc, "endpoints", path),
            home_region=_region(doc, "home_region", path),
            key_expiry=_opt_number(doc, "key_expiry", path),
        )


def interface_addresses(
    node: NodeInfo, v4: IPv4Network, v6: IPv6Network
) -> tuple[IPv4Interface, IPv6Interface]:
    """A node's interface addresses: its overlay addresses with the ranges' prefix lengths
    (so the kernel routes the whole overlay to the interface)."""
    return IPv4Interface(f"{node.ipv4}/{v4.prefixlen}"), IPv6Interface(
        f"{node.ipv6}/{v6.prefixlen}"
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
        doc = _load(data)
        return cls(
            node=NodeInfo.from_json(doc.get("node"), "node"),
            token=_str(doc, "token"),
            ipv4_range=_ip(doc, "ipv4_range", IPv4Network),
            ipv6_range=_ip(doc, "ipv6_range", IPv6Network),
            derp=derp_from_json(doc.get("derp")),
        )

    def encode(self) -> bytes:
        return _dump(
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


@dataclass(frozen=True, slots=True)
class NetMap:
    """`GET /api/v1/netmap`: the network as one node sees it at `version`."""

    version: int
    self_node: NodeInfo
    peers: tuple[NodeInfo, ...]
    ipv4_range: IPv4Network
    ipv6_range: IPv6Network
    derp: DerpConfig

    def addresses(self) -> tuple[IPv4Interface, IPv6Interface]:
        """This node's interface addresses, with the overlay ranges as prefixes."""
        return interface_addresses(self.self_node, self.ipv4_range, self.ipv6_range)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = _load(data)
        peers = _field(doc, "peers", list)
        version = _field(doc, "version", int)
        return cls(
            version=version,
            self_node=NodeInfo.from_json(doc.get("self"), "self"),
            peers=tuple(NodeInfo.from_json(p, f"peers[{i}]") for i, p in enumerate(peers)),
            ipv4_range=_ip(doc, "ipv4_range", IPv4Network),
            ipv6_range=_ip(doc, "ipv6_range", IPv6Network),
            derp=derp_from_json(doc.get("derp")),
        )

    def encode(self) -> bytes:
        return _dump(
            {
                "version": self.version,
                "self": self.self_node.to_json(),
                "peers": [p.to_json() for p in self.peers],
                "ipv4_range": str(self.ipv4_range),
                "ipv6_range": str(self.ipv6_range),
                "derp": derp_to_json(self.derp),
            }
        )
