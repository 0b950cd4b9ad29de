"""The coordinator's tables, and how a database made by an older coordinator is brought up to date.

    version    (id = 1, value)          bumped by every change a netmap can show; servers poll it
    meta       (name, value)            'schema' = SCHEMA_VERSION, 'server_key' = the coordinator's
                                        X25519 private key (hex), 'policy' = the access policy's
                                        text (HuJSON, absent = no policy: everyone reaches everyone)
    auth_keys  (id, key_hash, prefix, reusable, created, expires, uses, revoked,
                user_name, tags (JSON list of "tag:..."))
    nodes      (id, name, node_key, disco_key, ipv4, ipv6, endpoints (JSON list of IP:PORT),
                home_region, token_hash, register_ts, auth_key_id, created, updated, key_expiry,
                user_name (NULL for a tagged node), tags (JSON list), hostname (as the node
                reported it; its name is derived from it))

Versions:
    1   the tables above without user_name, tags and hostname
    2   + auth_keys.user_name and tags, nodes.user_name, tags and hostname. Migrating from 1: every
        key and node belongs to DEFAULT_USER, untagged; a node's hostname is its name.

`upgrade()` runs inside the caller's write transaction, with the schema row locked first on
PostgreSQL, so two instances starting together migrate once. A database newer than this code is
refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

__all__ = ["SCHEMA_VERSION", "DEFAULT_USER", "SchemaTooNew", "upgrade"]

SCHEMA_VERSION: Final = 2
DEFAULT_USER: Final = "default"  # the owner of keys and nodes from before users existed

Execute = Callable[[str], Any]


class SchemaTooNew(Exception):
    """The database was made by a newer coordinator."""


def _base(id_type: str, real: str) -> list[str]:
    """Schema version 1: fresh databases start here and migrate like old ones."""
    return [
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
    ]


# Statements taking version N-1 to N (both backends: ADD COLUMN with a constant default).
_MIGRATIONS: Final[dict[int, list[str]]] = {
    2: [
        f"ALTER TABLE auth_keys ADD COLUMN user_name TEXT NOT NULL DEFAULT '{DEFAULT_USER}'",
        "ALTER TABLE auth_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE nodes ADD COLUMN user_name TEXT",
        f"UPDATE nodes SET user_name = '{DEFAULT_USER}'",
        "ALTER TABLE nodes ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE nodes ADD COLUMN hostname TEXT NOT NULL DEFAULT ''",
        "UPDATE nodes SET hostname = name",
    ],
}


def upgrade(execute: Execute, *, id_type: str, real: str, postgres: bool) -> int:
    """Create or migrate the schema inside the caller's write transaction; the version found
    (0 for a fresh database). SchemaTooNew when the database is newer than this code."""
    execute("CREATE TABLE IF NOT EXISTS version (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)")
    execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    execute("INSERT INTO version (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
    lock = " FOR UPDATE" if postgres else ""  # SQLite's BEGIN IMMEDIATE already serializes
    row = execute(f"SELECT value FROM meta WHERE name = 'schema'{lock}").fetchone()
    found = 0 if row is None else int(row[0])
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database has schema version {found}; this coordinator knows up to "
            f"{SCHEMA_VERSION} (upgrade the coordinator)"
        )
    if found == SCHEMA_VERSION:
        return found
    if found == 0:
        for stmt in _base(id_type, real):
            execute(stmt)
    for version in range(max(found, 1) + 1, SCHEMA_VERSION + 1):
        for stmt in _MIGRATIONS[version]:
            execute(stmt)
    execute(
        f"INSERT INTO meta (name, value) VALUES ('schema', '{SCHEMA_VERSION}') "
        f"ON CONFLICT (name) DO UPDATE SET value = '{SCHEMA_VERSION}'"
    )
    return found
