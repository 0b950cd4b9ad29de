"""The relay's per-client receive rate limit (tailscale derpserver.go, cmd/derper --rate-config):
the token bucket in RelayCore with a fake clock, then the shell over loopback TLS (reading paused
and resumed), then `agent derper --rate-config` reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from nacl.public import PrivateKey

from agent.netio.certs import make_self_signed
from agent.netio.tls_stream import serve_streams
from agent.proto.derp.client import DerpClientConn, PacketReceived
from agent.proto.derp.frames import (
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    FrameType,
    Ping,
    Pong,
    SendPacket,
)
from agent.proto.derp.server import (
    RATE_LIMIT_MIN_BURST,
    RATE_LIMIT_MIN_WAIT,
    CloseConnection,
    PauseReading,
    RelayCore,
    ResumeReading,
)
from agent.proto.derp.upgrade import parse_response
from agent.proto.errors import LocalProtocolError
from agent.relay.main import load_rate_config
from agent.relay.server import RateLimit, RelayServer, serve_relay
from tests.derp_stream import DerpStreamClient

T0 = 1000.0
MESH_KEY = bytes(range(32))
LOG = structlog.get_logger()
REPO = Path(__file__).resolve().parents[2]


# --- the core, fake clock -------------------------------------------------------------------------


def _key(seed: int) -> bytes:
    return bytes(PrivateKey(random.Random(seed).randbytes(32)))


def _pub(seed: int) -> bytes:
    return bytes(PrivateKey(_key(seed)).public_key)


def _core() -> RelayCore:
    return RelayCore(_key(1), randbytes=random.Random(7).randbytes, mesh_key=MESH_KEY)


def _login(core: RelayCore, conn_id: int, seed: int, *, mesh: bool = False) -> bytes:
    client = DerpClientConn(
        _key(seed), randbytes=random.Random(seed).randbytes, mesh_key=MESH_KEY if mesh else None
    )
    client.connection_made(T0)
    core.connection_made(conn_id, T0)
    client.receive_data(core.data_to_send(conn_id), T0)
    core.receive_data(conn_id, client.data_to_send(), T0)
    client.receive_data(core.data_to_send(conn_id), T0)
    core.events()
    return _pub(seed)


def _recv_packets(data: bytes) -> list[bytes]:
    """The packets of the RecvPacket frames in `data` (whole frames only)."""
    packets, pos = [], 0
    while pos + FRAME_HEADER_LEN <= len(data):
        kind, length = FRAME_HEADER.unpack_from(data, pos)
        start = pos + FRAME_HEADER_LEN
        if kind == FrameType.RECV_PACKET:
            packets.append(data[start + 32 : start + length])
        pos = start + length
    assert pos == len(data)
    return packets


def _sends(dst: bytes, count: int, size: int) -> tuple[bytes, list[bytes]]:
    packets = [i.to_bytes(4, "big") + bytes(size - 4) for i in range(count)]
    return b"".join(SendPacket(dst, p).encode() for p in packets), packets


class Clocked:
    """Runs the core's timers on a fake clock and collects what a receiver gets."""

    def __init__(self, core: RelayCore) -> None:
        self.core = core
        self.now = T0
        self.events: list[object] = []
        self.raw: dict[int, bytearray] = {}  # output of connections not in `collect`

    def advance_to(self, until: float, *, collect: dict[int, list[bytes]]) -> None:
        while True:
            deadline = self.core.next_deadline()
            if deadline is None or deadline > until:
                break
            self.now = max(self.now, deadline)
            self.core.on_timer(self.now)
            self.drain(collect)
        self.now = until
        self.drain(collect)

    def drain(self, collect: dict[int, list[bytes]]) -> None:
        self.events += self.core.events()
        for conn_id, out in self.core.take_output():
            if conn_id in collect:
                collect[conn_id] += _recv_packets(bytes(out))
            else:
                self.raw.setdefault(conn_id, bytearray()).extend(out)


def test_a_fast_sender_is_slowed_to_the_limit_without_drops() -> None:
    core = _core()
    rate = 100_000
    core.set_rate_limit(rate, 0, T0)
    assert core.rate_limit() == (rate, RATE_LIMIT_MIN_BURST)  # burst raised to the floor
    _login(core, 1, 11)
    b = _login(core, 2, 12)
    _login(core, 3, 13)
    d = _login(core, 4, 14)
    data, packets = _sends(b, 1000, 1000)  # 1032 bytes charged per frame
    clock = Clocked(core)
    got: dict[int, list[bytes]] = {2: [], 4: []}
    core.receive_data(1, data, T0)
    clock.drain(got)
    pauses = [e for e in clock.events if isinstance(e, PauseReading)]
    assert len(pauses) == 1
    assert pauses[0].conn_id == 1
    assert pauses[0].until > T0
    assert core.paused_count() == 1
    assert len(got[2]) == RATE_LIMIT_MIN_BURST // 1032  # the burst goes through at once

    # Two seconds later: burst + 2 s of tokens, within a frame and the 10 ms wake-up quantum.
    clock.advance_to(T0 + 1.0, collect=got)
    # Meanwhile another client sends: unaffected, delivered at once.
    core.receive_data(3, SendPacket(d, b"other client").encode(), clock.now)
    clock.drain(got)
    assert got[4] == [b"other client"]
    clock.advance_to(T0 + 2.0, collect=got)
    expected = (RATE_LIMIT_MIN_BURST + 2.0 * rate) / 1032
    assert expected - 2 - rate * RATE_LIMIT_MIN_WAIT / 1032 <= len(got[2]) <= expected + 1

    # Everything arrives in the end, in order; nothing was dropped.
    clock.advance_to(T0 + 20.0, collect=got)
    assert got[2] == packets
    assert core.drops == {}
    resumes = [e for e in clock.events if isinstance(e, ResumeReading)]
    assert resumes == [ResumeReading(1)]
    assert core.paused_count() == 0
    assert core.counters.throttle_pauses == 1
    done_at = (1000 * 1032 - RATE_LIMIT_MIN_BURST) / rate
    assert done_at - 0.05 <= core.counters.throttled_seconds <= done_at + 0.05


def test_the_limit_applies_to_frames_after_clientinfo_in_the_same_read() -> None:
    """Fast start: ClientInfo and packets in one write; the packets are charged."""
    core = _core()
    core.set_rate_limit(50_000, 70_000, T0)
    b = _login(core, 2, 12)
    client = DerpClientConn(_key(11), randbytes=random.Random(11).randbytes)
    client.connection_made(T0)
    core.connection_made(1, T0)
    client.receive_data(core.data_to_send(1), T0)
    login = client.data_to_send()
    data, packets = _sends(b, 100, 1400)
    core.receive_data(1, login + data, T0)
    core.data_to_send(1)
    assert any(isinstance(e, PauseReading) for e in core.events())
    delivered = _recv_packets(core.data_to_send(2))
    assert len(delivered) == 70_000 // 1432
    clock = Clocked(core)
    got: dict[int, list[bytes]] = {2: delivered}
    clock.advance_to(T0 + 10.0, collect=got)
    assert got[2] == packets


def test_held_input_keeps_its_order_and_a_ping_waits_its_turn() -> None:
    core = _core()
    core.set_rate_limit(10_000, 0, T0)
    _login(core, 1, 11)
    b = _login(core, 2, 12)
    data, packets = _sends(b, 80, 1000)
    ping = Ping(b"12345678").encode()
    # Fed in odd pieces while throttled: held behind the frames that wait already.
    stream = data + ping
    for i in range(0, len(stream), 777):
        core.receive_data(1, stream[i : i + 777], T0)
    assert core.data_to_send(1) == b""
    clock = Clocked(core)
    got: dict[int, list[bytes]] = {2: []}
    clock.advance_to(T0 + 1.0, collect=got)
    assert 1 not in clock.raw  # the Ping is still behind the packets
    clock.advance_to(T0 + 4.0, collect=got)
    # 80 * 1032 bytes at 10 kB/s after a 65568-byte burst: done after ~1.7 s.
    assert clock.raw[1] == Pong(b"12345678").encode()
    assert got[2] == packets


def test_mesh_peers_are_exempt() -> None:
    core = _core()
    core.set_rate_limit(1_000, 0, T0)
    _login(core, 1, 11, mesh=True)
    b = _login(core, 2, 12)
    data, packets = _sends(b, 300, 1400)
    core.receive_data(1, data, T0)
    assert _recv_packets(core.data_to_send(2)) == packets
    assert not any(isinstance(e, PauseReading) for e in core.events())


def test_lifting_the_limit_releases_what_waits_and_a_new_one_applies_to_everyone() -> None:
    core = _core()
    core.set_rate_limit(1_000, 0, T0)
    _login(core, 1, 11)
    b = _login(core, 2, 12)
    data, packets = _sends(b, 100, 1400)
    core.receive_data(1, data[:-700], T0)  # the last frame incomplete
    first = _recv_packets(core.data_to_send(2))
    assert 0 < len(first) < 99
    assert [type(e) for e in core.events()] == [PauseReading]
    core.set_rate_limit(0, 0, T0 + 0.5)
    assert core.events() == [ResumeReading(1)]
    assert first + _recv_packets(core.data_to_send(2)) == packets[:99]
    core.receive_data(1, data[-700:], T0 + 0.5)
    assert _recv_packets(core.data_to_send(2)) == packets[99:]
    assert core.paused_count() == 0
    # Turned on again: registered clients get a full bucket at the new rate.
    core.set_rate_limit(20_000, 0, T0 + 1.0)
    core.receive_data(1, data, T0 + 1.0)
    assert len(_recv_packets(core.data_to_send(2))) == RATE_LIMIT_MIN_BURST // 1432
    assert core.paused_count() == 1
    with pytest.raises(LocalProtocolError):
        core.set_rate_limit(-1, 0, T0)


def test_a_bad_frame_held_behind_the_limit_closes_at_its_turn() -> None:
    core = _core()
    core.set_rate_limit(10_000, 0, T0)
    _login(core, 1, 11)
    b = _login(core, 2, 12)
    data, _ = _sends(b, 70, 1000)
    core.receive_data(1, data, T0)  # now throttled
    core.receive_data(1, bytes([FrameType.SEND_PACKET]) + (5).to_bytes(4, "big") + b"short", T0)
    core.events()
    clock = Clocked(core)
    clock.advance_to(T0 + 5.0, collect={})
    closes = [e for e in clock.events if isinstance(e, CloseConnection)]
    assert len(closes) == 1
    assert closes[0].conn_id == 1
    assert "protocol error" in closes[0].reason
    assert core.paused_count() == 0


def test_load_rate_config(tmp_path: Path) -> None:
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 1000, "perclientrateburstbytes": 5}')
    assert load_rate_config(path) == RateLimit(1000, 5)
    path.write_text("{}")
    assert load_rate_config(path) == RateLimit(0, 0)
    for bad in ("[1]", "nope", '{"PerClientRateLimitBytesPerSec": -1}', '{"x": 1, '):
        path.write_text(bad)
        with pytest.raises(ValueError, match=r"rate\.json"):
            load_rate_config(path)
    path.write_text('{"PerClientRateBurstBytes": "10"}')
    with pytest.raises(ValueError, match="PerClientRateBurstBytes"):
        load_rate_config(path)


# --- the shell over loopback TLS ------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, Path]:
    cert, key = make_self_signed(tmp_path / "certs", "127.0.0.1")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert)), cert


RATE = 300_000


@pytest_asyncio.fixture
async def relay(tls: tuple[ssl.SSLContext, ssl.SSLContext, Path]) -> AsyncIterator[RelayServer]:
    server = await serve_relay(
        "127.0.0.1",
        0,
        private_key=secrets.token_bytes(32),
        ssl_context=tls[0],
        stun_port=None,
        log=LOG,
        rate_limit=RateLimit(RATE, 0),
    )
    try:
        yield server
    finally:
        await server.close()


async def _client(port: int, ctx: ssl.SSLContext) -> DerpStreamClient:
    return await DerpStreamClient.connect(port, ctx)


class Receiver:
    """Counts the packet bytes a client receives, with the time each batch arrived."""

    def __init__(self, client: DerpStreamClient) -> None:
        self.client = client
        self.got: list[tuple[float, bytes]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while chunk := await self.client.reader.read(1 << 16):
            self.client.conn.receive_data(chunk, loop.time())
            for event in self.client.conn.events():
                if isinstance(event, PacketReceived):
                    self.got.append((loop.time(), event.packet))

    def bytes_by(self, when: float) -> int:
        return sum(len(p) + 32 for t, p in self.got if t <= when)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.mark.asyncio
async def test_relay_throttles_a_flood_over_tls_and_others_keep_talking(
    relay: RelayServer, tls: tuple[ssl.SSLContext, ssl.SSLContext, Path]
) -> None:
    loop = asyncio.get_running_loop()
    a, b, c, d = [await _client(relay.port, tls[1]) for _ in range(4)]
    rx_b, rx_d = Receiver(b), Receiver(d)
    try:
        size, count = 1400, 700  # 1432 bytes charged per frame, ~1 MB in all
        packets = [i.to_bytes(4, "big") + bytes(size - 4) for i in range(count)]
        start = loop.time()
        a.writer.write(b"".join(SendPacket(b.conn.public_key, p).encode() for p in packets))
        # c -> d while a is throttled: delivered promptly, every one.
        latencies = []
        for i in range(10):
            sent = loop.time()
            c.writer.write(SendPacket(d.conn.public_key, b"c%d" % i).encode())
            while len(rx_d.got) <= i:
                await asyncio.sleep(0.002)
                assert loop.time() - sent < 2.0, "c -> d stalled"
            latencies.append(rx_d.got[i][0] - sent)
            await asyncio.sleep(0.1)
        assert [p for _, p in rx_d.got] == [b"c%d" % i for i in range(10)]
        assert max(latencies) < 0.25, latencies
        assert relay.core.paused_count() == 1
        # About the limit, measured over the first ~1 s (burst + rate * t).
        at = loop.time() - start
        got = rx_b.bytes_by(start + at)
        expected = RATE_LIMIT_MIN_BURST + RATE * at
        assert 0.85 * expected <= got <= 1.1 * expected + 1432, (got, expected, at)
        # Then all of it, in order.
        while len(rx_b.got) < count:
            await asyncio.sleep(0.01)
            assert loop.time() - start < 10, len(rx_b.got)
        assert [p for _, p in rx_b.got] == packets
        took = rx_b.got[-1][0] - start
        ideal = (count * 1432 - RATE_LIMIT_MIN_BURST) / RATE
        assert 0.9 * ideal <= took <= 1.5 * ideal, (took, ideal)
        await asyncio.sleep(0.05)
        assert relay.core.paused_count() == 0
        assert relay.core.drops == {}
        assert relay.dropped_frames == 0
        assert relay.core.counters.throttle_pauses >= 1
        text = relay.metrics_text()
        assert f"derp_rate_limit_bytes_per_second {RATE}" in text
        assert "derp_rate_limited_total 0\n" not in text
    finally:
        await rx_b.stop()
        await rx_d.stop()
        for client in (a, b, c, d):
            await client.close()


class Pauser(asyncio.Protocol):
    """Pauses reading on its first input; records what it got."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.calls = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.calls += 1
        if self.calls == 1:
            assert self.transport is not None
            self.transport.pause_reading()
            assert not self.transport.is_reading()


@pytest.mark.parametrize("use_tls", [True, False])
@pytest.mark.asyncio
async def test_stream_pause_and_resume_reading(
    tls: tuple[ssl.SSLContext, ssl.SSLContext, Path], use_tls: bool
) -> None:
    protocols: list[Pauser] = []

    def factory() -> Pauser:
        protocols.append(Pauser())
        return protocols[-1]

    server = await serve_streams(factory, "127.0.0.1", 0, ssl_context=tls[0] if use_tls else None)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls[1] if use_tls else None,
            server_hostname="127.0.0.1" if use_tls else None,
        )
        total = 4 << 20  # more than one read budget, and more than the socket buffers hold
        writer.write(bytes(total))
        await asyncio.sleep(0.3)
        (proto,) = protocols
        first = proto.received
        assert 0 < first < total
        assert proto.calls == 1  # nothing delivered while paused (nor OpenSSL's pending bytes)
        assert proto.transport is not None
        proto.transport.write(b"writes go on")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"writes go on"
        proto.transport.resume_reading()
        assert proto.transport.is_reading()
        await asyncio.wait_for(writer.drain(), 5)
        deadline = asyncio.get_running_loop().time() + 5
        while proto.received < total:
            assert asyncio.get_running_loop().time() < deadline, proto.received
            await asyncio.sleep(0.01)
        assert proto.received == total
        writer.close()
    finally:
        server.close()


# --- agent derper --rate-config, SIGHUP -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _metric(port: int, ctx: ssl.SSLContext, name: str) -> float:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    try:
        writer.write(b"GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    parsed = parse_response(body)
    assert parsed is not None
    assert parsed[0].status == 200
    for line in parsed[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


async def _measure(port: int, ctx: ssl.SSLContext, seconds: float) -> tuple[int, int]:
    """(bytes charged that arrived within `seconds`, bytes sent) for one flat-out sender."""
    a, b = await _client(port, ctx), await _client(port, ctx)
    rx = Receiver(b)
    try:
        data = b"".join(SendPacket(b.conn.public_key, bytes(1400)).encode() for _ in range(500))
        start = asyncio.get_running_loop().time()
        a.writer.write(data)
        await asyncio.sleep(seconds)
        return rx.bytes_by(start + seconds), len(data) - 500 * FRAME_HEADER_LEN
    finally:
        await rx.stop()
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_derper_reloads_the_rate_config_on_sighup(tmp_path: Path) -> None:
    rate_file = tmp_path / "rate.json"
    rate_file.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 0}))
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "derper", "--addr", f"127.0.0.1:{port}",
        "--hostname", "127.0.0.1", "--cert-dir", str(tmp_path), "--stun-port", "0",
        "--rate-config", str(rate_file), "--log-level", "info",
        cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        ctx: ssl.SSLContext | None = None
        deadline = time.monotonic() + 20
        while ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=str(tmp_path / "127.0.0.1.crt"))
                await _metric(port, ctx, "derp_clients")
            except (OSError, ssl.SSLError):
                ctx = None
                assert proc.returncode is None, "derper exited"
                assert time.monotonic() < deadline, "derper did not start"
                await asyncio.sleep(0.1)
        got, sent = await _measure(port, ctx, 0.5)
        assert got == sent  # no limit: all 700 kB within half a second

        rate = 150_000
        rate_file.write_text(json.dumps({"PerClientRateLimitBytesPerSec": rate}))
        proc.send_signal(signal.SIGHUP)
        while await _metric(port, ctx, "derp_rate_limit_bytes_per_second") != rate:
            assert time.monotonic() < deadline + 10, "SIGHUP not applied"
            await asyncio.sleep(0.05)
        got, sent = await _measure(port, ctx, 1.0)
        expected = RATE_LIMIT_MIN_BURST + rate * 1.0
        assert 0.8 * expected <= got <= 1.15 * expected, (got, expected)
        assert await _metric(port, ctx, "derp_rate_limited_total") >= 1

        rate_file.write_text("not json")  # a bad file keeps the limit in force
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await _metric(port, ctx, "derp_rate_limit_bytes_per_second") == rate
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert proc.stderr is not None
        err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0, err
    assert "derper rate limit reloaded" in err
    assert "derper rate limit reload failed" in err
