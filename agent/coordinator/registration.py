"""Registration policy: who may join (or come back), under which name, with which addresses.

    node key registered, key not expired     no auth key needed; keeps its key expiry
    otherwise                                a valid auth key (one use counted); the key expiry
                                             restarts at now + key_lifetime
    an existing node                         keeps its id and both addresses
    a new node                               the lowest free IPv4 offset in the range; the IPv6
                                             address has the same offset in the ULA range
    the name                                 a DNS label from the host name, made unique with
                                             -2, -3, ... against other nodes
    `timestamp`                              must be newer than the node's last registration

Everything runs inside one write transaction of the caller's Database (store.py retries it on a
UNIQUE clash with another coordinator instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from agent.coordinator.database import Database
from agent.coordinator.records import (
    NODE_COLUMNS,
    AddressesExhausted,
    AuthKeyRejected,
    NodeExpired,
    NodeRecord,
    ReplayedRegistration,
    auth_key_from_row,
    endpoints_json,
    hash_secret,
    node_from_row,
)
from agent.keys import DiscoPublic, NodePublic
from agent.proto.coordinator_messages import Endpoint

__all__ = ["Registration", "register", "use_auth_key"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What a node asks for when it joins."""

    auth_key: str
    node_key: NodePublic
    disco_key: DiscoPublic
    hostname: str
    endpoints: tuple[Endpoint, ...]
    home_region: int | None
    timestamp: float


def use_auth_key(db: Database, secret: str, now: float) -> int:
    """Check and count one use of an auth key inside the caller's transaction; its id."""
    row = db.execute(
        "SELECT id, prefix, reusable, created, expires, uses, revoked FROM auth_keys "
        "WHERE key_hash = ?",
        (hash_secret(secret),),
    ).fetchone()
    if row is None:
        raise AuthKeyRejected("invalid_auth_key", "unknown auth key")
    key = auth_key_from_row(row)
    state = key.state(now)
    if state != "valid":
        raise AuthKeyRejected(f"auth_key_{state}", f"auth key {key.prefix}... is {state}")
    db.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?", (key.id,))
    return key.id


def register(
    db: Database,
    reg: Registration,
    *,
    token: str,
    key_lifetime: float | None,
    ipv4_range: IPv4Network,
    ipv6_range: IPv6Network,
    now: float,
) -> NodeRecord:
    """Apply `reg` inside the caller's write transaction; the node as stored, whose bearer
    token is now `token`."""
    row = db.execute(
        f"SELECT {NODE_COLUMNS}, register_ts FROM nodes WHERE node_key = ?",
        (reg.node_key.to_b64(),),
    ).fetchone()
    existing = node_from_row(row[:-1]) if row is not None else None
    if existing is not None and reg.timestamp <= float(row[-1]):
        raise ReplayedRegistration("registration timestamp not newer than the last one")
    expiry = existing.key_expiry if existing is not None else None
    key_id: int | None = None
    if existing is None or existing.expired(now):
        if not reg.auth_key:
            if existing is not None:
                raise NodeExpired(
                    f"the key of node {existing.name!r} expired: register with a new auth key"
                )
            raise AuthKeyRejected("invalid_auth_key", "an auth key is required to join")
        key_id = use_auth_key(db, reg.auth_key, now)
        expiry = None if key_lifetime is None else now + key_lifetime
    name = _free_name(db, _clean_name(reg.hostname), None if existing is None else existing.id)
    if existing is None:
        ipv4, ipv6 = _allocate(db, ipv4_range, ipv6_range)
        row = db.execute(
            "INSERT INTO nodes (name, node_key, disco_key, ipv4, ipv6, endpoints, "
            "home_region, token_hash, register_ts, auth_key_id, created, updated, "
            "key_expiry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                name,
                reg.node_key.to_b64(),
                reg.disco_key.to_b64(),
                str(ipv4),
                str(ipv6),
                endpoints_json(reg.endpoints),
                reg.home_region,
                hash_secret(token),
                reg.timestamp,
                key_id,
                now,
                now,
                expiry,
            ),
        ).fetchone()
        node_id = int(row[0])
    else:
        node_id = existing.id
        db.execute(
            "UPDATE nodes SET name = ?, disco_key = ?, endpoints = ?, home_region = ?, "
            "token_hash = ?, register_ts = ?, updated = ?, key_expiry = ?, "
            "auth_key_id = COALESCE(?, auth_key_id) WHERE id = ?",
            (
                name,
                reg.disco_key.to_b64(),
                endpoints_json(reg.endpoints),
                reg.home_region,
                hash_secret(token),
                reg.timestamp,
                now,
                expiry,
                key_id,
                node_id,
            ),
        )
    row = db.execute(f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return node_from_row(row)


def _clean_name(hostname: str) -> str:
    """A DNS label from whatever the node calls itself: lower case, [a-z0-9-], 1..63."""
    label = hostname.split(".", 1)[0].lower()
    out = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in label)
    return out.strip("-")[:63].strip("-") or "node"


def _free_name(db: Database, base: str, own_id: int | None) -> str:
    """`base`, or `base-2`, `base-3`... : the first not held by another node."""
    rows = db.execute(
        "SELECT id, name FROM nodes WHERE name = ? OR name LIKE ?", (base, base + "-%")
    ).fetchall()
    taken = {str(name) for nid, name in rows if own_id is None or int(nid) != own_id}
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}"[:63] in taken:
        n += 1
    return f"{base[: 62 - len(str(n))]}-{n}"


def _allocate(db: Database, v4: IPv4Network, v6: IPv6Network) -> tuple[IPv4Address, IPv6Address]:
    """The lowest free host offset in the IPv4 range; the IPv6 address has the same offset
    in the ULA range (so the pair is unique together)."""
    base4 = int(v4.network_address)
    used = sorted(
        int(IPv4Address(r[0])) - base4 for r in db.execute("SELECT ipv4 FROM nodes").fetchall()
    )
    offset = 1
    for u in used:
        if u < offset:
            continue
        if u > offset:
            break
        offset += 1
    if offset >= v4.num_addresses - 1 or offset >= v6.num_addresses:
        raise AddressesExhausted(f"no free address left in {v4}")
    return IPv4Address(base4 + offset), IPv6Address(int(v6.network_address) + offset)
