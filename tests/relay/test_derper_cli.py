"""`agent derper` as a user runs it: a process serving TLS /generate_204 and STUN on loopback."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from agent.proto import stun


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_derper_serves_tls_and_stun_and_stops_on_sigterm(tmp_path: Path) -> None:
    port, stun_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "derper",
            "--addr",
            f"127.0.0.1:{port}",
            "--hostname",
            "127.0.0.1",
            "--cert-dir",
            str(tmp_path),
            "--stun-port",
            str(stun_port),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                ctx = ssl.create_default_context(cafile=str(tmp_path / "127.0.0.1.crt"))
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
                conn.request("GET", "/generate_204")
                assert conn.getresponse().status == 204
                break
            except (ConnectionRefusedError, FileNotFoundError, ssl.SSLError):
                assert proc.poll() is None, "derper exited early"
                assert time.monotonic() < deadline, "derper did not start"
                time.sleep(0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.bind(("127.0.0.1", 0))
            txid = stun.new_txid()
            s.sendto(stun.binding_request(txid), ("127.0.0.1", stun_port))
            got_txid, mapped = stun.parse_response(s.recv(1500))
            assert got_txid == txid
            assert mapped == s.getsockname()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=10)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert rc == 0, err
    assert "derper up" in err


def test_derper_bad_addr_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "derper", "--addr", "nonsense"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == "agent: --addr 'nonsense': expected HOST:PORT, :PORT or [V6]:PORT"


# --- persistent key, mesh and verify-clients flags ----------------------------------------------


class Derper:
    """`agent derper` on loopback with self-signed certs in `cert_dir`; stopped by `stop()`."""

    def __init__(self, cert_dir: Path, *extra: str, port: int | None = None) -> None:
        self.cert_dir = cert_dir
        self.port = port or _free_port(socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "agent", "derper",
                "--addr", f"127.0.0.1:{self.port}", "--hostname", "127.0.0.1",
                "--cert-dir", str(cert_dir), "--stun-port", "0", *extra,
            ],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.client_ctx(), timeout=5
                )
                conn.request("GET", "/generate_204")
                assert conn.getresponse().status == 204
                return
            except (ConnectionRefusedError, FileNotFoundError, ssl.SSLError):
                assert self.proc.poll() is None, "derper exited early"
                assert time.monotonic() < deadline, "derper did not start"
                time.sleep(0.1)

    def client_ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_dir / "127.0.0.1.crt"))

    def stop(self) -> str:
        self.proc.terminate()
        rc = self.proc.wait(timeout=10)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        assert rc == 0, err
        return err

    def server_key(self) -> str:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.client_ctx())
        conn.putrequest("GET", "/derp")
        conn.putheader("Connection", "Upgrade")
        conn.putheader("Upgrade", "DERP")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 101
        key = response.getheader("Derp-Public-Key")
        conn.close()
        assert key is not None
        return key


def test_derper_config_key_survives_restart(tmp_path: Path) -> None:
    config = tmp_path / "derper.key"
    first = Derper(tmp_path, "--config", str(config))
    try:
        key = first.server_key()
    finally:
        first.stop()
    assert config.stat().st_mode & 0o777 == 0o600
    second = Derper(tmp_path, "--config", str(config))
    try:
        assert second.server_key() == key
    finally:
        second.stop()
    third = Derper(tmp_path)  # without --config: a fresh key every start
    try:
        assert third.server_key() != key
    finally:
        third.stop()


def test_two_derpers_mesh_over_tls(tmp_path: Path) -> None:
    """Both list the whole region (each skips itself); they share one self-signed cert here."""
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text("ab" * 32 + "\n")
    ports = [_free_port(socket.SOCK_STREAM) for _ in range(2)]
    flags = [
        "--mesh-key-file", str(mesh_key),
        "--mesh-ca-file", str(tmp_path / "127.0.0.1.crt"),
        "--mesh-with", ",".join(f"https://127.0.0.1:{p}" for p in ports),
    ]  # fmt: skip
    one = Derper(tmp_path, *flags, port=ports[0])  # creates the cert before two starts
    two: Derper | None = None
    try:
        two = Derper(tmp_path, *flags, port=ports[1])
        asyncio.run(_packet_across(one, two))
    finally:
        err = one.stop()
        if two is not None:
            err += two.stop()
    assert err.count("mesh_link_up") >= 2


async def _packet_across(one: Derper, two: Derper) -> None:
    from agent.proto.derp.client import Connected, PacketReceived
    from tests.derp_stream import DerpStreamClient

    clients = []
    for node in (one, two):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", node.port, ssl=node.client_ctx(), server_hostname="127.0.0.1"
        )
        client = await DerpStreamClient.upgrade(reader, writer, f"127.0.0.1:{node.port}")
        await client.wait_for(lambda e: isinstance(e, Connected))
        clients.append(client)
    a, b = clients
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        got = None
        while got is None:  # until the mesh has told node one about B
            assert loop.time() < deadline, "no packet across the mesh"
            a.conn.send_packet(b.conn.public_key, b"across", loop.time())
            a.flush()
            try:
                got = await asyncio.wait_for(
                    b.wait_for(lambda e: isinstance(e, PacketReceived)), 0.2
                )
            except TimeoutError:
                continue
        assert got == PacketReceived(a.conn.public_key, b"across")
    finally:
        await a.close()
        await b.close()


def test_derper_bad_mesh_key_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.key"
    bad.write_text("not hex\n")
    r = subprocess.run(
        [sys.executable, "-m", "agent", "derper", "--addr", "127.0.0.1:0",
         "--hostname", "127.0.0.1", "--cert-dir", str(tmp_path), "--mesh-key-file", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip() == f"agent: derper: mesh key file {bad}: expected 64 hex digits"


def test_derper_mesh_with_needs_a_key(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "derper", "--addr", "127.0.0.1:0",
         "--hostname", "127.0.0.1", "--cert-dir", str(tmp_path),
         "--mesh-with", "https://198.18.0.11"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip() == "agent: derper: --mesh-with needs --mesh-key-file"
