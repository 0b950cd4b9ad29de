"""`agent derper` as a user runs it: a process serving TLS /generate_204 and STUN on loopback."""

from __future__ import annotations

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
