"""The coordinator's database backend: SQLite (a file path) or PostgreSQL (a URL, psycopg 3).

One schema and one set of queries serve both; only the id column type, the placeholder (`?` is
rewritten to `%s` for psycopg) and how a write transaction starts differ. The tables and their
migrations are schema.py; `open()` creates or migrates them.

Names, node keys, token hashes and both overlay addresses are UNIQUE, so two coordinator
instances on one PostgreSQL database cannot hand out the same address twice: the loser of such a
clash gets an integrity error, and `retrying` runs its transaction again with fresh reads. A write
transaction takes SQLite's write lock at once (BEGIN IMMEDIATE); on PostgreSQL the writers
serialize on the `version` row each one updates first. A PostgreSQL connection found broken is
opened again before the next statement outside a transaction.

Everything here is blocking; what the rows mean is the store's business (store.py).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from agent.coordinator.schema import SCHEMA_VERSION, SchemaTooNew, upgrade

__all__ = ["SCHEMA_VERSION", "WRITE_RETRIES", "Cursor", "Database", "DatabaseError"]

WRITE_RETRIES: Final = 5  # a UNIQUE clash between instances is retried with fresh reads

_R = TypeVar("_R")


class DatabaseError(Exception):
    """The database cannot be opened or set up (the message says which and why)."""


class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class _Conn(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...
    def close(self) -> None: ...


class Database:
    """One connection; `open()` creates the schema when missing, `close()` when done."""

    def __init__(
        self,
        conn: _Conn,
        *,
        postgres: bool,
        integrity_errors: tuple[type[BaseException], ...],
        db_errors: tuple[type[BaseException], ...],
        description: str,
        reconnect: Callable[[], _Conn] | None = None,
    ) -> None:
        self._conn = conn
        self.postgres = postgres
        self.integrity_errors = integrity_errors
        self.db_errors = db_errors
        self.description = description
        self._reconnect = reconnect  # PostgreSQL: after a lost connection
        self._in_tx = False

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, database: str) -> Database:
        """A path (SQLite, created with its directory if missing) or `postgresql://...`.

        OSError or DatabaseError (with the reason) when it cannot be opened."""
        if database.startswith(("postgresql://", "postgres://")):
            db = cls._open_postgres(database)
        else:
            db = cls._open_sqlite(Path(database))
        id_type, real = db._types()
        try:
            with db.write():
                upgrade(db.execute, id_type=id_type, real=real, postgres=db.postgres)
        except SchemaTooNew as e:
            db.close()
            raise DatabaseError(f"{db.description}: {e}") from e
        except db.db_errors as e:
            db.close()
            raise DatabaseError(f"{db.description}: {e}") from e
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def _open_sqlite(cls, path: Path) -> Database:
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
            raise DatabaseError(f"cannot open the SQLite database {str(path)!r}: {e}") from e
        if created:
            _match_owner(path)
        return cls(
            conn,
            postgres=False,
            integrity_errors=(sqlite3.IntegrityError,),
            db_errors=(sqlite3.Error,),
            description=f"sqlite:{path}",
        )

    @classmethod
    def _open_postgres(cls, url: str) -> Database:
        try:
            import psycopg
        except ImportError as e:
            raise DatabaseError(
                "a postgresql:// database needs psycopg 3: pip install 'psycopg[binary]'"
            ) from e
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e
        info = conn.info
        return cls(
            conn,
            postgres=True,
            integrity_errors=(psycopg.IntegrityError,),
            db_errors=(psycopg.Error,),
            description=f"postgresql:{info.host}:{info.port}/{info.dbname}",
            reconnect=lambda: psycopg.connect(url, autocommit=True, connect_timeout=10),
        )

    def close(self) -> None:
        self._conn.close()

    def _types(self) -> tuple[str, str]:
        if self.postgres:
            return "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"
        return "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"

    # -- statements and transactions ---------------------------------------------------------------

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor:
        """One statement, `?` placeholders on both backends."""
        if self.postgres:
            sql = sql.replace("?", "%s")
            if (
                not self._in_tx
                and self._reconnect is not None
                and getattr(self._conn, "broken", False)
            ):
                self._conn.close()
                self._conn = self._reconnect()  # the statement that saw it break has failed
        cur: Cursor = self._conn.execute(sql, params)
        return cur

    def write(self) -> AbstractContextManager[None]:
        """One write transaction (SQLite takes the write lock at once)."""
        return self._transaction("BEGIN" if self.postgres else "BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[None]:
        """Several reads that see one state (no write lock)."""
        return self._transaction("BEGIN")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        """`begin`, the body, COMMIT; a rollback when the body raises."""
        self.execute(begin)
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        finally:
            self._in_tx = False
        self.execute("COMMIT")

    def _rollback(self) -> None:
        if getattr(self._conn, "broken", False):
            return  # nothing to roll back on a lost connection
        self.execute("ROLLBACK")

    def retrying(self, write: Callable[[], _R]) -> _R:
        """`write()` (a whole write transaction), again up to WRITE_RETRIES times in all when
        it hits a UNIQUE clash with another coordinator instance sharing the database."""
        for attempt in range(WRITE_RETRIES):
            try:
                return write()
            except self.integrity_errors:
                if attempt == WRITE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")


def _match_owner(path: Path) -> None:
    """A database file created by root (the admin CLI) takes its directory's owner, so the
    coordinator service running as its own user can still write it."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    if st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid)
