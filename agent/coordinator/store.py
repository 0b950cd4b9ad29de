"""The coordinator's state: auth keys, nodes, registration and the netmap snapshot, kept in a
database (agent/coordinator/database.py: SQLite or PostgreSQL, the schema, transactions).

Every change a netmap can show bumps `version` inside its write transaction; servers poll it.
Times are unix seconds (floats) passed in as `now`; nothing here reads a clock. Removal deletes the
row; expiry sets `key_expiry` to `now`. A node whose key expired is kept (it can come back with a
new auth key and keep its addresses) but is left out of every netmap. Who may join and which
name and addresses a node gets is registration.py.

All methods are blocking: the server runs them on one worker thread, the admin CLI directly.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from typing import Final

from agent.coordinator.database import Database, DatabaseError
from agent.coordinator.identity import describe_refusal, tags_not_owned
from agent.coordinator.records import (
    AUTH_KEY_COLUMNS,
    NODE_COLUMNS,
    AddressesExhausted,
    AuthKey,
    AuthKeyRejected,
    NodeExpired,
    NodeRecord,
    NotFound,
    ReplayedRegistration,
    Snapshot,
    StoreError,
    TagsNotAllowed,
    auth_key_from_row,
    endpoints_json,
    hash_secret,
    node_from_row,
    tags_json,
)
from agent.coordinator.registration import Registration, register
from agent.coordinator.schema import DEFAULT_USER, SCHEMA_VERSION
from agent.keys import DiscoPublic, NodePrivate, NodePublic, clamp
from agent.proto.coordinator_messages import Endpoint

__all__ = [
    "SCHEMA_VERSION",
    "DEFAULT_USER",
    "AUTH_KEY_PREFIX",
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
    "Store",
    "hash_secret",
]

AUTH_KEY_PREFIX: Final = "agentkey-"
_PREFIX_SHOWN: Final = len(AUTH_KEY_PREFIX) + 6  # what `keys list` shows of a key


class Store:
    """The coordinator's state. `open()` creates the schema when missing; `close()` when done."""

    def __init__(
        self, db: Database, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._db = db
        self._randbytes = randbytes

    @classmethod
    def open(
        cls, database: str, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> Store:
        """A path (SQLite, created with its directory if missing) or `postgresql://...`.

        OSError or StoreError (with the reason) when it cannot be opened."""
        try:
            db = Database.open(database)
        except DatabaseError as e:
            raise StoreError(str(e)) from e
        return cls(db, randbytes=randbytes)

    @property
    def description(self) -> str:
        """Which database, for logs: `sqlite:PATH` or `postgresql:HOST:PORT/NAME`."""
        return self._db.description

    def close(self) -> None:
        self._db.close()

    def _bump(self) -> int:
        row = self._db.execute("UPDATE version SET value = value + 1 WHERE id = 1 RETURNING value")
        return int(row.fetchone()[0])

    # -- version and snapshot ----------------------------------------------------------------------

    def version(self) -> int:
        return int(self._db.execute("SELECT value FROM version WHERE id = 1").fetchone()[0])

    def bump_version(self) -> int:
        """Tell every server the netmaps changed (used when a key expiry time passes)."""
        with self._db.write():
            return self._bump()

    def snapshot(self) -> Snapshot:
        with self._db.read():
            version = int(self._db.execute("SELECT value FROM version WHERE id = 1").fetchone()[0])
            rows = self._db.execute(f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
            policy = self.policy()
        return Snapshot(version=version, nodes=tuple(node_from_row(r) for r in rows), policy=policy)

    def next_expiry(self, after: float) -> float | None:
        """The earliest node key expiry later than `after`, if any."""
        row = self._db.execute(
            "SELECT MIN(key_expiry) FROM nodes WHERE key_expiry > ?", (after,)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- the coordinator's own key -----------------------------------------------------------------

    def server_key(self) -> NodePrivate:
        """The coordinator's X25519 private key, created on first use and shared by instances."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'server_key'").fetchone()
        if row is None:
            fresh = NodePrivate(clamp(self._randbytes(32)))
            with self._db.write():
                self._db.execute(
                    "INSERT INTO meta (name, value) VALUES ('server_key', ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (fresh.to_hex(),),
                )
            row = self._db.execute("SELECT value FROM meta WHERE name = 'server_key'").fetchone()
        return NodePrivate.from_hex(str(row[0]))

    # -- auth keys ---------------------------------------------------------------------------------

    def create_auth_key(
        self,
        *,
        reusable: bool,
        expires: float | None,
        now: float,
        user: str = DEFAULT_USER,
        tags: tuple[str, ...] = (),
    ) -> tuple[str, AuthKey]:
        """A new auth key: (the secret, shown once, its record). Nodes joining with it belong to
        `user`, or with `tags` are tagged nodes; TagsNotAllowed when a policy is set and its
        tagOwners do not let `user` assign them. `user` and `tags` are checked by identity.py."""
        secret = AUTH_KEY_PREFIX + self._randbytes(24).hex()
        prefix = secret[:_PREFIX_SHOWN]
        with self._db.write():
            refused = tags_not_owned(self.policy(), user, tags)
            if refused:
                raise TagsNotAllowed(describe_refusal(user, refused))
            row = self._db.execute(
                "INSERT INTO auth_keys (key_hash, prefix, reusable, created, expires, "
                "user_name, tags) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (hash_secret(secret), prefix, int(reusable), now, expires, user, tags_json(tags)),
            ).fetchone()
        key = AuthKey(
            id=int(row[0]),
            prefix=prefix,
            reusable=reusable,
            created=now,
            expires=expires,
            uses=0,
            revoked=False,
            user=user,
            tags=tags,
        )
        return secret, key

    def list_auth_keys(self) -> list[AuthKey]:
        rows = self._db.execute(f"SELECT {AUTH_KEY_COLUMNS} FROM auth_keys ORDER BY id").fetchall()
        return [auth_key_from_row(r) for r in rows]

    def known_users(self) -> set[str]:
        """Every user an auth key or a node names (what a policy's bare user names may be)."""
        rows = self._db.execute(
            "SELECT user_name FROM auth_keys UNION "
            "SELECT user_name FROM nodes WHERE user_name IS NOT NULL"
        ).fetchall()
        return {str(r[0]) for r in rows}

    # -- the access policy -------------------------------------------------------------------------

    def policy(self) -> str | None:
        """The policy's text as set (None: no policy, everyone reaches everyone)."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'policy'").fetchone()
        return None if row is None else str(row[0])

    def set_policy(self, text: str) -> int:
        """Store a policy (the caller has checked it); the new version, so that every server
        sends new netmaps."""
        with self._db.write():
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES ('policy', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (text,),
            )
            return self._bump()

    def clear_policy(self) -> int | None:
        """Remove the policy (every node reaches every other again); the new version, or None
        when no policy was set (nothing changes then)."""
        with self._db.write():
            row = self._db.execute(
                "DELETE FROM meta WHERE name = 'policy' RETURNING name"
            ).fetchone()
            return None if row is None else self._bump()

    def revoke_auth_key(self, key_id: int) -> None:
        with self._db.write():
            row = self._db.execute(
                "UPDATE auth_keys SET revoked = 1 WHERE id = ? RETURNING id", (key_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no auth key with id {key_id}")

    # -- nodes -------------------------------------------------------------------------------------

    def list_nodes(self) -> list[NodeRecord]:
        rows = self._db.execute(f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
        return [node_from_row(r) for r in rows]

    def find_node(self, name_or_id: str) -> NodeRecord:
        """By id (digits) or name; NotFound otherwise."""
        if name_or_id.isdigit():
            row = self._db.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (int(name_or_id),)
            ).fetchone()
        else:
            row = self._db.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?", (name_or_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no node {name_or_id!r}")
        return node_from_row(row)

    def node_by_token(self, token: str) -> NodeRecord | None:
        row = self._db.execute(
            f"SELECT {NODE_COLUMNS} FROM nodes WHERE token_hash = ?", (hash_secret(token),)
        ).fetchone()
        return None if row is None else node_from_row(row)

    def remove_node(self, node_id: int) -> None:
        with self._db.write():
            if self._db.execute(
                "DELETE FROM nodes WHERE id = ? RETURNING id", (node_id,)
            ).fetchone():
                self._bump()
                return
        raise NotFound(f"no node with id {node_id}")

    def expire_node(self, node_id: int, now: float) -> None:
        with self._db.write():
            row = self._db.execute(
                "UPDATE nodes SET key_expiry = ?, updated = ? WHERE id = ? RETURNING id",
                (now, now, node_id),
            ).fetchone()
            if row is not None:
                self._bump()
                return
        raise NotFound(f"no node with id {node_id}")

    def update_node(
        self,
        node_id: int,
        *,
        disco_key: DiscoPublic,
        endpoints: tuple[Endpoint, ...],
        home_region: int | None,
        now: float,
    ) -> tuple[NodeRecord, bool]:
        """Set a node's endpoints, home region and disco key: (the node, whether it changed);
        the version is bumped only on a change. NotFound/NodeExpired when it cannot."""
        with self._db.write():
            row = self._db.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no node with id {node_id}")
            node = node_from_row(row)
            if node.expired(now):
                raise NodeExpired(f"the key of node {node.name!r} expired")
            if (node.disco_key, node.endpoints, node.home_region) == (
                disco_key,
                endpoints,
                home_region,
            ):
                return node, False
            self._db.execute(
                "UPDATE nodes SET disco_key = ?, endpoints = ?, home_region = ?, updated = ? "
                "WHERE id = ?",
                (disco_key.to_b64(), endpoints_json(endpoints), home_region, now, node_id),
            )
            self._bump()
        changed = replace(
            node, disco_key=disco_key, endpoints=endpoints, home_region=home_region, updated=now
        )
        return changed, True

    def register_node(
        self,
        *,
        auth_key: str,
        node_key: NodePublic,
        disco_key: DiscoPublic,
        hostname: str,
        endpoints: tuple[Endpoint, ...],
        home_region: int | None,
        timestamp: float,
        key_lifetime: float | None,
        ipv4_range: IPv4Network,
        ipv6_range: IPv6Network,
        now: float,
    ) -> tuple[NodeRecord, str]:
        """Join (or come back): (the node, its new bearer token).

        A node key that is registered and not expired needs no auth key (`auth_key` is then not
        looked at) and keeps its key expiry; otherwise the auth key must be valid, one use is
        counted and the key expiry restarts at `now + key_lifetime`. An existing node keeps its
        id and addresses. `timestamp` must be newer than the node's last registration
        (ReplayedRegistration). A clash with another instance is retried with fresh reads."""
        reg = Registration(
            auth_key=auth_key,
            node_key=node_key,
            disco_key=disco_key,
            hostname=hostname,
            endpoints=endpoints,
            home_region=home_region,
            timestamp=timestamp,
        )

        def attempt() -> tuple[NodeRecord, str]:
            token = self._randbytes(32).hex()
            with self._db.write():
                self._bump()
                node = register(
                    self._db,
                    reg,
                    token=token,
                    key_lifetime=key_lifetime,
                    ipv4_range=ipv4_range,
                    ipv6_range=ipv6_range,
                    now=now,
                )
            return node, token

        return self._db.retrying(attempt)
