"""The coordinator's Store against a real SQLite file and a real PostgreSQL (when available)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from agent.coordinator.database import WRITE_RETRIES, Database
from agent.coordinator.store import (
    AddressesExhausted,
    AuthKeyRejected,
    NodeExpired,
    NotFound,
    ReplayedRegistration,
    Store,
    StoreError,
)
from agent.keys import DiscoPrivate, DiscoPublic, NodePrivate, NodePublic

V4 = IPv4Network("100.64.0.0/10")
V6 = IPv6Network("fd7a:115c:a1e0::/48")
NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    s = Store.open(database)
    try:
        yield s
    finally:
        s.close()


def _disco() -> DiscoPublic:
    return DiscoPrivate.generate().public()


def _register(
    store: Store,
    auth_key: str,
    *,
    node_key: NodePublic | None = None,
    hostname: str = "node",
    now: float = NOW,
    timestamp: float | None = None,
    lifetime: float | None = 180 * DAY,
    v4: IPv4Network = V4,
) -> Any:
    return store.register_node(
        auth_key=auth_key,
        node_key=node_key or NodePrivate.generate().public(),
        disco_key=_disco(),
        hostname=hostname,
        endpoints=(("198.18.0.1", 41641),),
        home_region=900,
        timestamp=now if timestamp is None else timestamp,
        key_lifetime=lifetime,
        ipv4_range=v4,
        ipv6_range=V6,
        now=now,
    )


def test_auth_keys_one_off_reusable_expired_revoked(store: Store) -> None:
    one, rec = store.create_auth_key(reusable=False, expires=NOW + DAY, now=NOW)
    many, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    short, _ = store.create_auth_key(reusable=True, expires=NOW + 10, now=NOW)
    revoked, rrec = store.create_auth_key(reusable=True, expires=None, now=NOW)
    store.revoke_auth_key(rrec.id)
    assert one.startswith("agentkey-")
    assert rec.prefix == one[: len(rec.prefix)]
    assert len(rec.prefix) < len(one)

    _register(store, one)
    with pytest.raises(AuthKeyRejected) as used:
        _register(store, one)
    assert used.value.code == "auth_key_used"
    for _ in range(3):
        _register(store, many)
    with pytest.raises(AuthKeyRejected) as expired:
        _register(store, short, now=NOW + 10)
    assert expired.value.code == "auth_key_expired"
    with pytest.raises(AuthKeyRejected) as rev:
        _register(store, revoked)
    assert rev.value.code == "auth_key_revoked"
    with pytest.raises(AuthKeyRejected) as bad:
        _register(store, "agentkey-" + "0" * 48)
    assert bad.value.code == "invalid_auth_key"
    with pytest.raises(AuthKeyRejected):
        _register(store, "")

    states = {k.id: (k.uses, k.state(NOW + 11)) for k in store.list_auth_keys()}
    assert list(states.values()) == [(1, "used"), (3, "valid"), (0, "expired"), (0, "revoked")]
    with pytest.raises(NotFound):
        store.revoke_auth_key(999)


def test_addresses_unique_lowest_free_and_reused_after_removal(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    nodes = [_register(store, key, hostname="n")[0] for _ in range(5)]
    assert [str(n.ipv4) for n in nodes] == [f"100.64.0.{i}" for i in range(1, 6)]
    assert [str(n.ipv6) for n in nodes] == [f"fd7a:115c:a1e0::{i}" for i in range(1, 6)]
    assert [n.name for n in nodes] == ["n", "n-1", "n-2", "n-3", "n-4"]  # as Tailscale
    store.remove_node(nodes[1].id)
    again = _register(store, key, hostname="n")[0]
    assert again.ipv4 == IPv4Address("100.64.0.2")
    assert again.ipv6 == IPv6Address("fd7a:115c:a1e0::2")
    assert again.id > nodes[-1].id  # ids are never reused
    assert again.name == "n-1"
    with pytest.raises(NotFound):
        store.remove_node(nodes[1].id)


def test_addresses_exhausted(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    tiny = IPv4Network("100.64.0.0/30")  # two hosts
    _register(store, key, v4=tiny)
    _register(store, key, v4=tiny)
    with pytest.raises(AddressesExhausted):
        _register(store, key, v4=tiny)
    assert len(store.list_nodes()) == 2


def test_two_connections_never_share_an_address(database: str) -> None:
    """Two coordinator instances on one database: interleaved registrations stay unique."""
    a, b = Store.open(database), Store.open(database)
    try:
        key, _ = a.create_auth_key(reusable=True, expires=None, now=NOW)
        for i in range(6):
            _register(a if i % 2 else b, key, hostname="host")
        nodes = a.list_nodes()
        assert len({n.ipv4 for n in nodes}) == 6
        assert len({n.name for n in nodes}) == 6
        assert a.server_key() == b.server_key()
    finally:
        a.close()
        b.close()


def test_reregister_without_auth_key_keeps_identity(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=False, expires=None, now=NOW)
    priv = NodePrivate.generate()
    first, token1 = _register(store, key, node_key=priv.public(), hostname="Alpha.lan")
    assert first.name == "alpha"
    assert first.key_expiry == NOW + 180 * DAY
    second, token2 = _register(store, "", node_key=priv.public(), now=NOW + 5, hostname="alpha")
    assert (second.id, second.ipv4, second.ipv6, second.name) == (
        first.id,
        first.ipv4,
        first.ipv6,
        first.name,
    )
    assert second.key_expiry == first.key_expiry  # no auth key: no renewal
    assert token1 != token2
    assert store.node_by_token(token1) is None
    found = store.node_by_token(token2)
    assert found is not None
    assert found.id == first.id


def test_replayed_registration_refused(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    priv = NodePrivate.generate()
    _register(store, key, node_key=priv.public(), timestamp=NOW)
    with pytest.raises(ReplayedRegistration):
        _register(store, key, node_key=priv.public(), timestamp=NOW, now=NOW + 1)
    _register(store, key, node_key=priv.public(), timestamp=NOW + 1, now=NOW + 1)


def test_expired_node_needs_a_new_auth_key_and_keeps_addresses(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=False, expires=None, now=NOW)
    priv = NodePrivate.generate()
    node, _ = _register(store, key, node_key=priv.public(), lifetime=100)
    later = NOW + 100
    assert node.expired(later)
    with pytest.raises(NodeExpired):
        _register(store, "", node_key=priv.public(), now=later)
    with pytest.raises(NodeExpired):
        store.update_node(node.id, disco_key=_disco(), endpoints=(), home_region=None, now=later)
    fresh, _ = store.create_auth_key(reusable=False, expires=None, now=NOW)
    back, _ = _register(store, fresh, node_key=priv.public(), now=later, lifetime=100)
    assert (back.id, back.ipv4) == (node.id, node.ipv4)
    assert back.key_expiry == later + 100


def test_admin_expire_and_next_expiry(store: Store) -> None:
    key, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    a, _ = _register(store, key, lifetime=50)
    b, _ = _register(store, key, lifetime=None)
    assert b.key_expiry is None
    assert store.next_expiry(NOW) == NOW + 50
    assert store.next_expiry(NOW + 50) is None
    v = store.version()
    store.expire_node(b.id, NOW + 1)
    assert store.version() == v + 1
    assert store.find_node(str(b.id)).expired(NOW + 1)
    assert store.find_node(a.name).id == a.id
    with pytest.raises(NotFound):
        store.find_node("nobody")
    with pytest.raises(NotFound):
        store.expire_node(999, NOW)


def test_version_bumps_only_on_changes(store: Store) -> None:
    v0 = store.version()
    key, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
    assert store.version() == v0
    node, _ = _register(store, key)
    v1 = store.version()
    assert v1 > v0
    disco = _disco()
    updated, changed = store.update_node(
        node.id, disco_key=disco, endpoints=(("198.18.0.9", 1),), home_region=901, now=NOW + 1
    )
    assert changed
    assert updated.home_region == 901
    v2 = store.version()
    assert v2 == v1 + 1
    _, changed = store.update_node(
        node.id, disco_key=disco, endpoints=(("198.18.0.9", 1),), home_region=901, now=NOW + 2
    )
    assert not changed
    assert store.version() == v2
    with pytest.raises(AuthKeyRejected):
        _register(store, "nope")
    assert store.version() == v2  # a refused registration rolls back its bump
    snap = store.snapshot()
    assert snap.version == v2
    assert [n.endpoints for n in snap.nodes] == [(("198.18.0.9", 1),)]
    assert store.bump_version() == v2 + 1


def test_reopen_keeps_everything(database: str) -> None:
    s = Store.open(database)
    key, _ = s.create_auth_key(reusable=True, expires=None, now=NOW)
    node, token = _register(s, key)
    server_key, version = s.server_key(), s.version()
    s.close()
    s = Store.open(database)
    try:
        assert s.server_key() == server_key
        assert s.version() == version
        again = s.node_by_token(token)
        assert again == node
        assert [k.uses for k in s.list_auth_keys()] == [1]
    finally:
        s.close()


def test_sqlite_database_directory_is_created(tmp_path: Path) -> None:
    s = Store.open(str(tmp_path / "state" / "sub" / "c.db"))
    s.close()
    assert (tmp_path / "state" / "sub" / "c.db").exists()


def test_postgresql_reconnects_after_a_lost_connection(pg_database: str) -> None:
    import psycopg

    database = pg_database
    s = Store.open(database)
    try:
        key, _ = s.create_auth_key(reusable=True, expires=None, now=NOW)
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(psycopg.OperationalError):
            s.version()  # the statement that finds the connection gone fails...
        _register(s, key)  # ...and the next one reconnects
        assert len(s.list_nodes()) == 1
    finally:
        s.close()


def test_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StoreError, match="not a database"):
        Store.open(str(junk))


def test_a_write_that_clashes_with_another_instance_is_retried(tmp_path: Path) -> None:
    db = Database.open(str(tmp_path / "c.db"))
    calls: list[int] = []

    def write(value: int, fail: int) -> int:
        calls.append(value)
        if len(calls) <= fail:
            raise sqlite3.IntegrityError("UNIQUE constraint failed")
        return value * 2

    try:
        assert db.retrying(lambda: write(21, 2)) == 42
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(sqlite3.IntegrityError):
            db.retrying(lambda: write(1, 99))
        assert len(calls) == WRITE_RETRIES
        calls.clear()
        with pytest.raises(ValueError, match="not a clash"):  # anything else is not retried
            db.retrying(lambda: (calls.append(0), int("not a clash")))
        assert len(calls) == 1
    finally:
        db.close()
