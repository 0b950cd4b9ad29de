"""What the coordinator's store hands out and refuses: its records and errors, and how a row
becomes a record.

Secrets are kept as SHA-256 hex digests only (`auth_keys.key_hash`, `nodes.token_hash`): a copy of
the database lets nobody join or act as a node. Times are unix seconds (floats).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from agent.keys import DiscoPublic, NodePublic
from agent.proto.coordinator_messages import Endpoint, NodeInfo
from agent.proto.endpoint import format_endpoint, parse_endpoint

__all__ = [
    "NODE_COLUMNS",
    "AUTH_KEY_COLUMNS",
    "StoreError",
    "AuthKeyRejected",
    "NodeExpired",
    "ReplayedRegistration",
    "NotFound",
    "AddressesExhausted",
    "TagsNotAllowed",
    "AuthKey",
    "NodeRecord",
    "Snapshot",
    "auth_key_from_row",
    "endpoints_json",
    "hash_secret",
    "node_from_row",
    "tags_json",
    "tags_from_json",
]


class StoreError(Exception):
    """Base of what the store refuses; `code` is the API error code it maps to."""

    code = "store_error"


class AuthKeyRejected(StoreError):
    """The auth key is unknown, used up, expired or revoked (`code` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NodeExpired(StoreError):
    code = "node_expired"


class ReplayedRegistration(StoreError):
    code = "replayed"


class NotFound(StoreError):
    code = "not_found"


class AddressesExhausted(StoreError):
    code = "addresses_exhausted"


class TagsNotAllowed(StoreError):
    """The policy's tagOwners do not let the key's user assign its tags."""

    code = "tags_not_allowed"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuthKey:
    """An auth key as listed (its secret is never stored, only its hash and first characters)."""

    id: int
    prefix: str
    reusable: bool
    created: float
    expires: float | None
    uses: int
    revoked: bool
    user: str  # who nodes joining with it belong to (and who vouches for its tags)
    tags: tuple[str, ...] = ()  # non-empty: nodes joining with it are tagged, owned by no user

    def state(self, now: float) -> str:
        """valid, used, expired or revoked."""
        if self.revoked:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if not self.reusable and self.uses:
            return "used"
        return "valid"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: int
    name: str
    node_key: NodePublic
    disco_key: DiscoPublic
    ipv4: IPv4Address
    ipv6: IPv6Address
    endpoints: tuple[Endpoint, ...]
    home_region: int | None
    created: float
    updated: float
    key_expiry: float | None
    user: str | None = None  # None for a tagged node: tags replace the user
    tags: tuple[str, ...] = ()

    def expired(self, now: float) -> bool:
        return self.key_expiry is not None and now >= self.key_expiry

    def info(self) -> NodeInfo:
        return NodeInfo(
            id=self.id,
            name=self.name,
            node_key=self.node_key,
            disco_key=self.disco_key,
            ipv4=self.ipv4,
            ipv6=self.ipv6,
            endpoints=self.endpoints,
            home_region=self.home_region,
            key_expiry=self.key_expiry,
            user=self.user,
            tags=self.tags,
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every node (expired ones too) and the policy's text (None: no policy) at `version`."""

    version: int
    nodes: tuple[NodeRecord, ...]
    policy: str | None = None


NODE_COLUMNS: Final = (
    "id, name, node_key, disco_key, ipv4, ipv6, endpoints, home_region, created, updated, "
    "key_expiry, user_name, tags"
)
AUTH_KEY_COLUMNS: Final = "id, prefix, reusable, created, expires, uses, revoked, user_name, tags"


def node_from_row(row: Any) -> NodeRecord:
    (nid, name, node_key, disco_key, ipv4, ipv6, endpoints, home, created, updated, expiry) = row[
        :11
    ]
    user, tags = row[11:13]
    return NodeRecord(
        id=int(nid),
        name=str(name),
        node_key=NodePublic.from_b64(node_key),
        disco_key=DiscoPublic.from_b64(disco_key),
        ipv4=IPv4Address(ipv4),
        ipv6=IPv6Address(ipv6),
        endpoints=tuple(parse_endpoint(e) for e in json.loads(endpoints)),
        home_region=None if home is None else int(home),
        created=float(created),
        updated=float(updated),
        key_expiry=None if expiry is None else float(expiry),
        user=None if user is None else str(user),
        tags=tags_from_json(tags),
    )


def auth_key_from_row(row: Any) -> AuthKey:
    kid, prefix, reusable, created, expires, uses, revoked, user, tags = row
    return AuthKey(
        id=int(kid),
        prefix=str(prefix),
        reusable=bool(reusable),
        created=float(created),
        expires=None if expires is None else float(expires),
        uses=int(uses),
        revoked=bool(revoked),
        user=str(user),
        tags=tags_from_json(tags),
    )


def endpoints_json(endpoints: tuple[Endpoint, ...]) -> str:
    return json.dumps([format_endpoint(e) for e in endpoints])


def tags_json(tags: tuple[str, ...]) -> str:
    return json.dumps(list(tags))


def tags_from_json(text: str) -> tuple[str, ...]:
    return tuple(str(t) for t in json.loads(text))
