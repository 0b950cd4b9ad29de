"""The coordinator's asyncio HTTPS shell: TLS streams, HTTP/1.1 by h11, the Service on one
database thread, and the long-poll.

    accept (netio/tls_stream.py: OpenSSL on the socket, ~15 KiB per idle TLS connection where
            asyncio's TLS transport costs ~270 KiB; every waiting node holds one connection)
      -> asyncio StreamReader/StreamWriter over that stream, h11 on top: request head (16 KiB,
         HEAD_TIMEOUT), body (MAX_BODY), then Service.handle() on the database thread;
         keep-alive until the client closes
         Reply            -> written as JSON
         WaitForNetmap    -> wait until the shared Snapshot's version differs from `since`
                             (or LONG_POLL seconds), then Service.netmap_reply() on the loop
    watcher task: every VERSION_POLL seconds (at once after a request that changed something)
         read the version; on a change load a new Snapshot and wake every waiting netmap; when
         a node key expiry time has passed, bump the version so everyone's netmap drops it

The version read is one indexed row, so each instance polls cheaply; admin CLI changes and other
instances' changes reach long-polls within VERSION_POLL plus one snapshot read. All database calls
run on one worker thread (`_db`), in order, so a slow PostgreSQL never blocks the event loop and
the store needs no locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import h11
from structlog.typing import FilteringBoundLogger

from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.service import Reply, Service, WaitForNetmap
from agent.coordinator.store import Snapshot, Store
from agent.netio.systemd import sd_notify
from agent.netio.tls_stream import StreamServer, serve_streams
from agent.proto.coordinator_messages import LONG_POLL, MAX_BODY, ErrorBody

__all__ = [
    "HEAD_TIMEOUT",
    "VERSION_POLL",
    "CoordinatorServer",
    "ServerStats",
    "serve_coordinator",
    "server_ssl_context",
    "run_coordinator",
]

HEAD_TIMEOUT: Final = 30.0  # idle keep-alive or a slow request head
VERSION_POLL: Final = 0.5
_MAX_HEAD: Final = 16 << 10
_T = TypeVar("_T")


@dataclass(slots=True)
class ServerStats:
    connections: int = 0
    requests: int = 0
    long_polls_waiting: int = 0
    snapshots_loaded: int = 0
    db_errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CoordinatorServer:
    """A running coordinator: `port`, `snapshot`, `stats`; `close()` stops it (not the store)."""

    def __init__(
        self,
        service: Service,
        log: FilteringBoundLogger,
        *,
        long_poll: float = LONG_POLL,
        version_poll: float = VERSION_POLL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.log = log
        self.long_poll = long_poll
        self.version_poll = version_poll
        self.clock = clock
        self.stats = ServerStats()
        self.snapshot = Snapshot(version=-1, nodes=())
        self.port = 0
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-db")
        self._changed = asyncio.Event()  # replaced after each set: waiters hold the old one
        self._poke = asyncio.Event()
        self._next_expiry: float | None = None
        self._server: StreamServer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def db(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        await self._refresh()

        def protocol() -> asyncio.BaseProtocol:
            reader = asyncio.StreamReader(limit=_MAX_HEAD)
            return asyncio.StreamReaderProtocol(reader, self._connection)

        self._server = await serve_streams(protocol, host or None, port, ssl_context=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        self._watcher = asyncio.create_task(self._watch(), name="coordinator-watch")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self._db.shutdown(wait=True)

    # -- the version watcher -----------------------------------------------------------------------

    async def _refresh(self) -> None:
        snap = await self.db(self.service.store.snapshot)
        now = self.clock()
        self._next_expiry = await self.db(lambda: self.service.store.next_expiry(now))
        if snap.version > self.snapshot.version:
            self.snapshot = snap
            self.stats.snapshots_loaded += 1
            self._changed.set()
            self._changed = asyncio.Event()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.version_poll)
            self._poke.clear()
            try:
                if self._next_expiry is not None and self.clock() >= self._next_expiry:
                    await self.db(self.service.store.bump_version)
                    self.log.info("node key expiry passed: netmaps change")
                version = await self.db(self.service.store.version)
                if version > self.snapshot.version:
                    await self._refresh()
            except Exception as e:  # noqa: BLE001 - a database outage must not end the watcher
                self.stats.db_errors += 1
                self.log.warning("coordinator database read failed", error=str(e))
                await asyncio.sleep(self.version_poll)

    async def _wait_netmap(self, wait: WaitForNetmap) -> Reply:
        if self.snapshot.version < wait.version:  # a change the watcher has not loaded yet
            await self._refresh()
        if wait.since is not None:
            deadline = asyncio.get_running_loop().time() + self.long_poll
            self.stats.long_polls_waiting += 1
            try:
                while self.snapshot.version == wait.since:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
            finally:
                self.stats.long_polls_waiting -= 1
        return self.service.netmap_reply(wait.node_id, self.snapshot, self.clock())

    # -- HTTP --------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.stats.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            while True:
                try:
                    request, body = await self._read_request(conn, reader)
                except _BadRequest as e:
                    if conn.our_state is h11.SEND_RESPONSE:
                        code = "too_large" if e.status == 413 else "bad_request"
                        await self._send(
                            conn,
                            writer,
                            Reply(e.status, ErrorBody(code, str(e)).encode()),
                            close=True,
                        )
                    break
                if request is None:
                    break
                started = time.monotonic()
                reply = await self._answer(request, body)
                await self._send(conn, writer, reply, head_only=request.method == b"HEAD")
                self.log.debug(
                    "request",
                    method=request.method.decode(),
                    path=request.target.decode("ascii", "replace").partition("?")[0],
                    status=reply.status,
                    ms=round((time.monotonic() - started) * 1000, 1),
                )
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (OSError, ssl.SSLError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        """The next request and its body; (None, b"") when the client is done."""
        request: h11.Request | None = None
        body = bytearray()
        async with asyncio.timeout(HEAD_TIMEOUT):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    raise _BadRequest(e.error_status_hint, str(e)) from None
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return None, b""
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and int(length) > MAX_BODY:
                        raise _BadRequest(413, f"a request body is at most {MAX_BODY} bytes")
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise _BadRequest(413, f"a request body is at most {MAX_BODY} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return request, bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    return None, b""

    async def _answer(self, request: h11.Request, body: bytes) -> Reply:
        self.stats.requests += 1
        headers = dict(request.headers)
        auth = headers.get(b"authorization")
        try:
            result = await self.db(
                lambda: self.service.handle(
                    request.method.decode(),
                    request.target.decode("ascii", "replace"),
                    None if auth is None else auth.decode("latin-1"),
                    body,
                    self.clock(),
                )
            )
        except Exception as e:  # noqa: BLE001 - a database outage answers 503, the server lives
            self.stats.db_errors += 1
            self.log.warning("coordinator request failed", error=str(e))
            return Reply(503, ErrorBody("unavailable", "database unavailable").encode())
        if isinstance(result, WaitForNetmap):
            return await self._wait_netmap(result)
        if result.changed:
            self._poke.set()
        return result

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        head_only: bool = False,
        close: bool = False,
    ) -> None:
        self.stats.by_status[reply.status] = self.stats.by_status.get(reply.status, 0) + 1
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(reply.body))),
            ("cache-control", "no-store"),
        ]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if not head_only:
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()


def server_ssl_context(config: CoordinatorConfig) -> ssl.SSLContext:
    """TLS as `agent derper` does it: self-signed (generated once in cert_dir) or manual."""
    from agent.netio.certs import make_self_signed

    cert_dir = Path(config.cert_dir)
    if config.tls_mode == "self-signed":
        cert, key = make_self_signed(cert_dir, config.hostname, program="agent coordinator")
    else:
        cert, key = cert_dir / f"{config.hostname}.crt", cert_dir / f"{config.hostname}.key"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve_coordinator(
    config: CoordinatorConfig,
    store: Store,
    log: FilteringBoundLogger,
    *,
    ssl_context: ssl.SSLContext | None,
    long_poll: float = LONG_POLL,
    version_poll: float = VERSION_POLL,
) -> CoordinatorServer:
    """Start serving `store` on config.listen (port 0 = any); the caller closes both."""
    service = Service(store, config)
    server = CoordinatorServer(service, log, long_poll=long_poll, version_poll=version_poll)
    host, port = config.listen
    await server.start(host, port, ssl_context)
    return server


def run_coordinator(config: CoordinatorConfig, log: FilteringBoundLogger) -> int:
    """`agent coordinator`: serve until SIGTERM/SIGINT. StoreError/OSError/ssl.SSLError (bad
    database, certificate or address) are raised before anything listens."""
    ctx = server_ssl_context(config)
    store = Store.open(config.database)

    async def main() -> None:
        server = await serve_coordinator(config, store, log, ssl_context=ctx)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "coordinator up",
            addr=f"{config.listen[0] or '*'}:{server.port}",
            database=store.description,
            version=server.snapshot.version,
            nodes=len(server.snapshot.nodes),
            public_key=server.service.server_key.public().to_b64(),
        )
        sd_notify(f"READY=1\nSTATUS=serving on port {server.port}")
        try:
            await stop.wait()
        finally:
            sd_notify("STOPPING=1")
            log.info("coordinator stopping")
            await server.close()

    try:
        asyncio.run(main())
    finally:
        store.close()
    return 0
