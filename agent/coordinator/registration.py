"""Registration policy: who may join (or come back), under which name, with which addresses.

    node key registered, key not expired     no auth key needed; keeps its key expiry
    otherwise                                a valid auth key (one use counted); the key expiry
                                             restarts at now + key_lifetime
    an existing node                         keeps its id and both addresses
    a new node                               the lowest free IPv4 offset in the range; the IPv6
                                             address has the same offset in the ULA range
    identity                                 set from the auth key whenever one is used: its
                                             user, or its tags (then no user); a tagged key is
                                             refused when the policy's tagOwners no longer let
                                             its user assign the tags (identity.py)
    the name                                 the host name as a DNS label (MagicDNS rules,
                                             agent/proto/dns/names.py), unique per network: a
                                             clash gets -1, -2, ...; a node keeps its name while
                                             its host name still maps to it
    `timestamp`                              must be newer than the node's last registration

Everything runs inside one write transaction of the caller's Database (store.py retries it on a
UNIQUE clash with another coordinator instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from agent.coordinator.database import Database
from agent.coordinator.identity import describe_refusal, tags_not_owned
from agent.coordinator.records import (
    AUTH_KEY_COLUMNS,
    NODE_COLUMNS,
    AddressesExhausted,
    AuthKey,
    AuthKeyRejected,
    NodeExpired,
    NodeRecord,
    ReplayedRegistration,
    auth_key_from_row,
    endpoints_json,
    hash_secret,
    node_from_row,
    tags_json,
)
from agent.keys import DiscoPublic, NodePublic
from agent.proto.coordinator_messages import Endpoint
from agent.proto.dns.names import assign_name, assign_names, sanitize_label

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


def use_auth_key(db: Database, secret: str, now: float) -> AuthKey:
    """Check and count one use of an auth key inside the caller's transaction; the key."""
    row = db.execute(
        f"SELECT {AUTH_KEY_COLUMNS} FROM auth_keys WHERE key_hash = ?", (hash_secret(secret),)
    ).fetchone()
    if row is None:
        raise AuthKeyRejected("invalid_auth_key", "unknown auth key")
    key = auth_key_from_row(row)
    state = key.state(now)
    if state != "valid":
        raise AuthKeyRejected(f"auth_key_{state}", f"auth key {key.prefix}... is {state}")
    if key.tags:
        _check_tag_owners(db, key)
    db.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?", (key.id,))
    return key


def _check_tag_owners(db: Database, key: AuthKey) -> None:
    row = db.execute("SELECT value FROM meta WHERE name = 'policy'").fetchone()
    refused = tags_not_owned(None if row is None else str(row[0]), key.user, key.tags)
    if refused:
        raise AuthKeyRejected(
            "auth_key_tags_not_allowed",
            f"auth key {key.prefix}...: {describe_refusal(key.user, refused)}",
        )


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
    key: AuthKey | None = None
    if existing is None or existing.expired(now):
        if not reg.auth_key:
            if existing is not None:
                raise NodeExpired(
                    f"the key of node {existing.name!r} expired: register with a new auth key"
                )
            raise AuthKeyRejected("invalid_auth_key", "an auth key is required to join")
        key = use_auth_key(db, reg.auth_key, now)
        expiry = None if key_lifetime is None else now + key_lifetime
    name = _name(db, reg.hostname, existing)
    if existing is None:
        assert key is not None  # a new node always presents one
        ipv4, ipv6 = _allocate(db, ipv4_range, ipv6_range)
        row = db.execute(
            "INSERT INTO nodes (name, node_key, disco_key, ipv4, ipv6, endpoints, "
            "home_region, token_hash, register_ts, auth_key_id, created, updated, "
            "key_expiry, user_name, tags, hostname) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                key.id,
                now,
                now,
                expiry,
                None if key.tags else key.user,
                tags_json(key.tags),
                reg.hostname,
            ),
        ).fetchone()
        node_id = int(row[0])
    else:
        node_id = existing.id
        if key is not None:  # a new auth key: the node takes its identity
            db.execute(
                "UPDATE nodes SET user_name = ?, tags = ?, auth_key_id = ? WHERE id = ?",
                (None if key.tags else key.user, tags_json(key.tags), key.id, node_id),
            )
        db.execute(
            "UPDATE nodes SET name = ?, hostname = ?, disco_key = ?, endpoints = ?, "
            "home_region = ?, token_hash = ?, register_ts = ?, updated = ?, key_expiry = ? "
            "WHERE id = ?",
            (
                name,
                reg.hostname,
                reg.disco_key.to_b64(),
                endpoints_json(reg.endpoints),
                reg.home_region,
                hash_secret(token),
                reg.timestamp,
                now,
                expiry,
                node_id,
            ),
        )
    row = db.execute(f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return node_from_row(row)


def _name(db: Database, hostname: str, existing: NodeRecord | None) -> str:
    """The node's name: its current one while `hostname` still maps to it, else the host
    name's label, or with the first free suffix (-1, -2, ...) when another node has it."""
    own_id = None if existing is None else existing.id
    taken = {
        str(name)
        for nid, name in db.execute("SELECT id, name FROM nodes").fetchall()
        if int(nid) != own_id
    }
    if existing is not None and existing.name not in taken:
        kept = assign_names({own_id: hostname}, {own_id: existing.name})[own_id]
        if kept == existing.name:
            return kept
    return assign_name(sanitize_label(hostname), taken)


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
