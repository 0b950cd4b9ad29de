"""Database fixtures: a fresh SQLite file per test, and a throwaway PostgreSQL cluster.

`database` is parametrized over both backends: "sqlite" is a file in tmp_path; "postgresql" is a
fresh database (CREATE DATABASE per test) in one cluster per session, made with Debian's
postgresql package (`initdb` + `pg_ctl` in a temp dir, a Unix socket only, no TCP, fsync off),
started as the `postgres` user when running as root. Without the package or psycopg the
PostgreSQL cases skip with the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_counter = itertools.count()


class PgCluster:
    def __init__(self, base: Path, bindir: Path, port: int) -> None:
        self.base = base
        self.bindir = bindir
        self.port = port

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.base}&port={self.port}"


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg 3 is not installed (pip install 'psycopg[binary]')")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres user to run a throwaway PostgreSQL cluster as")
    base = Path(tempfile.mkdtemp(prefix="agent-pg-"))
    if os.geteuid() == 0:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    port = 50000 + os.getpid() % 10000
    cluster = PgCluster(base, bindir, port)
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    opts = f"-k {base} -c listen_addresses='' -p {port} -c fsync=off"  # a Unix socket only
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log")]
    try:
        subprocess.run(
            _as_postgres([*initdb, "--no-sync", "-E", "UTF8"]), check=True, capture_output=True
        )
        subprocess.run(_as_postgres([*start, "-w", "start"]), check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot start a throwaway PostgreSQL: {e.stderr.decode()[-300:]}")
    try:
        yield cluster
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def _new_pg_database(cluster: PgCluster) -> str:
    import psycopg

    name = f"test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return cluster.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database the Store can open: an SQLite path or a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "coordinator.db")
    return _new_pg_database(request.getfixturevalue("pg_cluster"))


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> str:
    """A fresh PostgreSQL database URL (skips without PostgreSQL)."""
    return _new_pg_database(pg_cluster)
