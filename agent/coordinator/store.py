"""The coordinator's state in a database: SQLite (a file path) or PostgreSQL (a URL, psycopg 3).

One schema and one set of queries serve both; only the id column type, the placeholder (`?` is
rewritten to `%s` for psycopg) and how a write transaction starts differ.

    version    (id = 1, value)          bumped by every change a netmap can show; servers poll it
    meta       (name, value)            'schema' = 1, 'server_key' = the coordinator's X25519
                                        private key (hex), shared by every coordinator instance
    auth_keys  (id, key_hash, prefix, reusable, created, expires, uses, revoked)
    nodes      (id, name, node_key, disco_key, ipv4, ipv6, endpoints (JSON list of IP:PORT),
                home_region, token_hash, register_ts, auth_key_id, created, updated, key_expiry)

Secrets are kept as SHA-256 hex digests only (`auth_keys.key_hash`, `nodes.token_hash`): a copy of
the database lets nobody join or act as a node. Names, node keys, token hashes and both overlay
addresses are UNIQUE, so two coordinator instances on one PostgreSQL database cannot hand out the
same address twice; every write transaction also starts by bumping `version` (SQLite: inside
BEGIN IMMEDIATE; PostgreSQL: the row lock on `version`), which serializes writers.

Times are unix seconds (floats) passed in as `now`; nothing here reads a clock. Removal deletes the
row; expiry sets `key_expiry` to `now`. A node whose key expired is kept (it can come back with a
new auth key and keep its addresses) but is left out of every netmap.

All methods are blocking: the server runs them on one worker thread, the admin CLI directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

from agent.keys import DiscoPublic, NodePrivate, NodePublic, clamp
from agent.proto.coordinator_messages import Endpoint, NodeInfo
from agent.proto.endpoint import format_endpoint, parse_endpoint

__all__ = [
    "SCHEMA_VERSION",
    "AUTH_KEY_PREFIX",
    "StoreError",
    "AuthKeyRejected",
    "NodeExpired",
    "ReplayedRegistration",
    "NotFound",
    "AddressesExhausted",
    "AuthKey",
    "NodeRecord",
    "Snapshot",
    "Store",
    "hash_secret",
]

SCHEMA_VERSION: Final = 1
AUTH_KEY_PREFIX: Final = "agentkey-"
_PREFIX_SHOWN: Final = len(AUTH_KEY_PREFIX) + 6  # what `keys list` shows of a key
_WRITE_RETRIES: Final = 5  # a UNIQUE clash between instances is retried with fresh reads

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _retried(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Run a write transaction again (up to _WRITE_RETRIES times) when it hits a UNIQUE clash
    with another coordinator instance sharing the database."""

    def retrying(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        for attempt in range(_WRITE_RETRIES):
            try:
                return method(self, *args, **kwargs)
            except self._integrity:
                if attempt == _WRITE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    functools.update_wrapper(retrying, method)
    return retrying


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
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every node (expired ones too) at `version`."""

    version: int
    nodes: tuple[NodeRecord, ...]


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class _Conn(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...
    def close(self) -> None: ...


_NODE_COLUMNS: Final = (
    "id, name, node_key, disco_key, ipv4, ipv6, endpoints, home_region, created, updated, "
    "key_expiry"
)


def _schema(id_type: str, real: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS version (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS auth_keys (
            id {id_type},
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            reusable INTEGER NOT NULL,
            created {real} NOT NULL,
            expires {real},
            uses BIGINT NOT NULL DEFAULT 0,
            revoked INTEGER NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE IF NOT EXISTS nodes (
            id {id_type},
            name TEXT NOT NULL UNIQUE,
            node_key TEXT NOT NULL UNIQUE,
            disco_key TEXT NOT NULL,
            ipv4 TEXT NOT NULL UNIQUE,
            ipv6 TEXT NOT NULL UNIQUE,
            endpoints TEXT NOT NULL,
            home_region BIGINT,
            token_hash TEXT NOT NULL UNIQUE,
            register_ts {real} NOT NULL,
            auth_key_id BIGINT,
            created {real} NOT NULL,
            updated {real} NOT NULL,
            key_expiry {real})""",
        "INSERT INTO version (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        f"INSERT INTO meta (name, value) VALUES ('schema', '{SCHEMA_VERSION}') "
        "ON CONFLICT (name) DO NOTHING",
    ]


def _node(row: Any) -> NodeRecord:
    (nid, name, node_key, disco_key, ipv4, ipv6, endpoints, home, created, updated, expiry) = row
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
    )


def _auth_key(row: Any) -> AuthKey:
    kid, prefix, reusable, created, expires, uses, revoked = row
    return AuthKey(
        id=int(kid),
        prefix=str(prefix),
        reusable=bool(reusable),
        created=float(created),
        expires=None if expires is None else float(expires),
        uses=int(uses),
        revoked=bool(revoked),
    )


def _endpoints_json(endpoints: tuple[Endpoint, ...]) -> str:
    return json.dumps([format_endpoint(e) for e in endpoints])


def _clean_name(hostname: str) -> str:
    """A DNS label from whatever the node calls itself: lower case, [a-z0-9-], 1..63."""
    label = hostname.split(".", 1)[0].lower()
    out = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in label)
    return out.strip("-")[:63].strip("-") or "node"


class Store:
    """The database. `open()` creates the schema when missing; `close()` when done."""

    def __init__(
        self,
        conn: _Conn,
        *,
        postgres: bool,
        integrity_errors: tuple[type[BaseException], ...],
        db_errors: tuple[type[BaseException], ...],
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._conn = conn
        self._pg = postgres
        self._integrity = integrity_errors
        self._db_errors = db_errors
        self._randbytes = randbytes
        self.description = ""
        self._reconnect: Callable[[], _Conn] | None = None  # PostgreSQL: after a lost connection
        self._in_tx = False

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, database: str, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> Store:
        """A path (SQLite, created with its directory if missing) or `postgresql://...`.

        OSError or StoreError (with the reason) when it cannot be opened."""
        if database.startswith(("postgresql://", "postgres://")):
            store = cls._open_postgres(database, randbytes)
        else:
            store = cls._open_sqlite(Path(database), randbytes)
        try:
            with store._tx():
                for stmt in _schema(*store._types()):
                    store._exec(stmt)
        except store._db_errors as e:
            store.close()
            raise StoreError(f"{store.description}: {e}") from e
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _open_sqlite(cls, path: Path, randbytes: Callable[[int], bytes]) -> Store:
        created = not path.exists()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite database {str(path)!r}: {e}") from e
        if created:
            _match_owner(path)
        store = cls(
            conn,
            postgres=False,
            integrity_errors=(sqlite3.IntegrityError,),
            db_errors=(sqlite3.Error,),
            randbytes=randbytes,
        )
        store.description = f"sqlite:{path}"
        return store

    @classmethod
    def _open_postgres(cls, url: str, randbytes: Callable[[int], bytes]) -> Store:
        try:
            import psycopg
        except ImportError as e:
            raise StoreError(
                "a postgresql:// database needs psycopg 3: pip install 'psycopg[binary]'"
            ) from e
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL: {e}") from e
        store = cls(
            conn,
            postgres=True,
            integrity_errors=(psycopg.IntegrityError,),
            db_errors=(psycopg.Error,),
            randbytes=randbytes,
        )
        store._reconnect = lambda: psycopg.connect(url, autocommit=True, connect_timeout=10)
        info = conn.info
        store.description = f"postgresql:{info.host}:{info.port}/{info.dbname}"
        return store

    def close(self) -> None:
        self._conn.close()

    def _types(self) -> tuple[str, str]:
        if self._pg:
            return "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"
        return "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"

    # -- low level ---------------------------------------------------------------------------------

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> _Cursor:
        if self._pg:
            sql = sql.replace("?", "%s")
            if (
                not self._in_tx
                and self._reconnect is not None
                and getattr(self._conn, "broken", False)
            ):
                self._conn.close()
                self._conn = self._reconnect()  # the statement that saw it break has failed
        cur: _Cursor = self._conn.execute(sql, params)
        return cur

    def _tx(self) -> AbstractContextManager[None]:
        """One write transaction (SQLite takes the write lock at once)."""
        return self._transaction("BEGIN" if self._pg else "BEGIN IMMEDIATE")

    def _read_tx(self) -> AbstractContextManager[None]:
        """Several reads that see one state (no write lock)."""
        return self._transaction("BEGIN")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        """`begin`, the body, COMMIT; a rollback when the body raises."""
        self._exec(begin)
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        finally:
            self._in_tx = False
        self._exec("COMMIT")

    def _rollback(self) -> None:
        if getattr(self._conn, "broken", False):
            return  # nothing to roll back on a lost connection
        self._exec("ROLLBACK")

    def _bump(self) -> int:
        row = self._exec("UPDATE version SET value = value + 1 WHERE id = 1 RETURNING value")
        return int(row.fetchone()[0])

    # -- version and snapshot ----------------------------------------------------------------------

    def version(self) -> int:
        return int(self._exec("SELECT value FROM version WHERE id = 1").fetchone()[0])

    def bump_version(self) -> int:
        """Tell every server the netmaps changed (used when a key expiry time passes)."""
        with self._tx():
            return self._bump()

    def snapshot(self) -> Snapshot:
        with self._read_tx():
            version = int(self._exec("SELECT value FROM version WHERE id = 1").fetchone()[0])
            rows = self._exec(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
        return Snapshot(version=version, nodes=tuple(_node(r) for r in rows))

    def next_expiry(self, after: float) -> float | None:
        """The earliest node key expiry later than `after`, if any."""
        row = self._exec(
            "SELECT MIN(key_expiry) FROM nodes WHERE key_expiry > ?", (after,)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- the coordinator's own key -----------------------------------------------------------------

    def server_key(self) -> NodePrivate:
        """The coordinator's X25519 private key, created on first use and shared by instances."""
        row = self._exec("SELECT value FROM meta WHERE name = 'server_key'").fetchone()
        if row is None:
            fresh = NodePrivate(clamp(self._randbytes(32)))
            with self._tx():
                self._exec(
                    "INSERT INTO meta (name, value) VALUES ('server_key', ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (fresh.to_hex(),),
                )
            row = self._exec("SELECT value FROM meta WHERE name = 'server_key'").fetchone()
        return NodePrivate.from_hex(str(row[0]))

    # -- auth keys ---------------------------------------------------------------------------------

    def create_auth_key(
        self, *, reusable: bool, expires: float | None, now: float
    ) -> tuple[str, AuthKey]:
        """A new auth key: (the secret, shown once, its record)."""
        secret = AUTH_KEY_PREFIX + self._randbytes(24).hex()
        prefix = secret[:_PREFIX_SHOWN]
        with self._tx():
            row = self._exec(
                "INSERT INTO auth_keys (key_hash, prefix, reusable, created, expires) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (hash_secret(secret), prefix, int(reusable), now, expires),
            ).fetchone()
        key = AuthKey(
            id=int(row[0]),
            prefix=prefix,
            reusable=reusable,
            created=now,
            expires=expires,
            uses=0,
            revoked=False,
        )
        return secret, key

    def list_auth_keys(self) -> list[AuthKey]:
        rows = self._exec(
            "SELECT id, prefix, reusable, created, expires, uses, revoked FROM auth_keys "
            "ORDER BY id"
        ).fetchall()
        return [_auth_key(r) for r in rows]

    def revoke_auth_key(self, key_id: int) -> None:
        with self._tx():
            row = self._exec(
                "UPDATE auth_keys SET revoked = 1 WHERE id = ? RETURNING id", (key_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no auth key with id {key_id}")

    def _use_auth_key(self, secret: str, now: float) -> int:
        """Check and count one use of an auth key inside the caller's transaction; its id."""
        row = self._exec(
            "SELECT id, prefix, reusable, created, expires, uses, revoked FROM auth_keys "
            "WHERE key_hash = ?",
            (hash_secret(secret),),
        ).fetchone()
        if row is None:
            raise AuthKeyRejected("invalid_auth_key", "unknown auth key")
        key = _auth_key(row)
        state = key.state(now)
        if state != "valid":
            raise AuthKeyRejected(f"auth_key_{state}", f"auth key {key.prefix}... is {state}")
        self._exec("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?", (key.id,))
        return key.id

    # -- nodes -------------------------------------------------------------------------------------

    def list_nodes(self) -> list[NodeRecord]:
        rows = self._exec(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
        return [_node(r) for r in rows]

    def find_node(self, name_or_id: str) -> NodeRecord:
        """By id (digits) or name; NotFound otherwise."""
        if name_or_id.isdigit():
            row = self._exec(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (int(name_or_id),)
            ).fetchone()
        else:
            row = self._exec(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?", (name_or_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no node {name_or_id!r}")
        return _node(row)

    def node_by_token(self, token: str) -> NodeRecord | None:
        row = self._exec(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE token_hash = ?", (hash_secret(token),)
        ).fetchone()
        return None if row is None else _node(row)

    def remove_node(self, node_id: int) -> None:
        with self._tx():
            if self._exec("DELETE FROM nodes WHERE id = ? RETURNING id", (node_id,)).fetchone():
                self._bump()
                return
        raise NotFound(f"no node with id {node_id}")

    def expire_node(self, node_id: int, now: float) -> None:
        with self._tx():
            row = self._exec(
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
        with self._tx():
            row = self._exec(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no node with id {node_id}")
            node = _node(row)
            if node.expired(now):
                raise NodeExpired(f"the key of node {node.name!r} expired")
            if (node.disco_key, node.endpoints, node.home_region) == (
                disco_key,
                endpoints,
                home_region,
            ):
                return node, False
            self._exec(
                "UPDATE nodes SET disco_key = ?, endpoints = ?, home_region = ?, updated = ? "
                "WHERE id = ?",
                (disco_key.to_b64(), _endpoints_json(endpoints), home_region, now, node_id),
            )
            self._bump()
        changed = replace(
            node, disco_key=disco_key, endpoints=endpoints, home_region=home_region, updated=now
        )
        return changed, True

    @_retried
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
        (ReplayedRegistration)."""
        token = self._randbytes(32).hex()
        with self._tx():
            self._bump()
            row = self._exec(
                f"SELECT {_NODE_COLUMNS}, register_ts FROM nodes WHERE node_key = ?",
                (node_key.to_b64(),),
            ).fetchone()
            existing = _node(row[:-1]) if row is not None else None
            if existing is not None and timestamp <= float(row[-1]):
                raise ReplayedRegistration("registration timestamp not newer than the last one")
            expiry = existing.key_expiry if existing is not None else None
            key_id: int | None = None
            if existing is None or existing.expired(now):
                if not auth_key:
                    if existing is not None:
                        raise NodeExpired(
                            f"the key of node {existing.name!r} expired: register with a new "
                            "auth key"
                        )
                    raise AuthKeyRejected("invalid_auth_key", "an auth key is required to join")
                key_id = self._use_auth_key(auth_key, now)
                expiry = None if key_lifetime is None else now + key_lifetime
            name = self._free_name(_clean_name(hostname), None if existing is None else existing.id)
            if existing is None:
                ipv4, ipv6 = self._allocate(ipv4_range, ipv6_range)
                row = self._exec(
                    "INSERT INTO nodes (name, node_key, disco_key, ipv4, ipv6, endpoints, "
                    "home_region, token_hash, register_ts, auth_key_id, created, updated, "
                    "key_expiry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        name,
                        node_key.to_b64(),
                        disco_key.to_b64(),
                        str(ipv4),
                        str(ipv6),
                        _endpoints_json(endpoints),
                        home_region,
                        hash_secret(token),
                        timestamp,
                        key_id,
                        now,
                        now,
                        expiry,
                    ),
                ).fetchone()
                node_id = int(row[0])
            else:
                node_id = existing.id
                self._exec(
                    "UPDATE nodes SET name = ?, disco_key = ?, endpoints = ?, home_region = ?, "
                    "token_hash = ?, register_ts = ?, updated = ?, key_expiry = ?, "
                    "auth_key_id = COALESCE(?, auth_key_id) WHERE id = ?",
                    (
                        name,
                        disco_key.to_b64(),
                        _endpoints_json(endpoints),
                        home_region,
                        hash_secret(token),
                        timestamp,
                        now,
                        expiry,
                        key_id,
                        node_id,
                    ),
                )
            row = self._exec(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)
            ).fetchone()
        return _node(row), token

    def _free_name(self, base: str, own_id: int | None) -> str:
        """`base`, or `base-2`, `base-3`... : the first not held by another node."""
        rows = self._exec(
            "SELECT id, name FROM nodes WHERE name = ? OR name LIKE ?", (base, base + "-%")
        ).fetchall()
        taken = {str(name) for nid, name in rows if own_id is None or int(nid) != own_id}
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}"[:63] in taken:
            n += 1
        return f"{base[: 62 - len(str(n))]}-{n}"

    def _allocate(self, v4: IPv4Network, v6: IPv6Network) -> tuple[IPv4Address, IPv6Address]:
        """The lowest free host offset in the IPv4 range; the IPv6 address has the same offset
        in the ULA range (so the pair is unique together)."""
        base4 = int(v4.network_address)
        used = sorted(
            int(IPv4Address(r[0])) - base4 for r in self._exec("SELECT ipv4 FROM nodes").fetchall()
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


def _match_owner(path: Path) -> None:
    """A database file created by root (the admin CLI) takes its directory's owner, so the
    coordinator service running as its own user can still write it."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    if st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid)
