"""Self-signed certificates of a relay and a coordinator on one host, trusted from one CA file.

Both are made for the same name (the host's address). With the same subject, OpenSSL looked up
the issuer of one and found the other ("self-signed certificate" verify failure), which broke
the first three-machine install: the subjects now name the program.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from agent.netio.certs import make_self_signed


def _handshake(cert: Path, key: Path, cafile: Path) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def accept() -> None:
            conn, _ = listener.accept()
            with conn, server.wrap_socket(conn, server_side=True):
                pass

        t = threading.Thread(target=accept)
        t.start()
        client = ssl.create_default_context(cafile=str(cafile))
        try:
            with client.wrap_socket(
                socket.create_connection(listener.getsockname(), timeout=5),
                server_hostname="127.0.0.1",
            ) as tls:
                assert tls.version() is not None
        finally:
            t.join(timeout=5)


def test_relay_and_coordinator_certificates_share_one_ca_file(tmp_path: Path) -> None:
    relay = make_self_signed(tmp_path / "relay", "127.0.0.1")
    coordinator = make_self_signed(tmp_path / "coord", "127.0.0.1", program="agent coordinator")
    bundle = tmp_path / "ca.pem"
    bundle.write_text(relay[0].read_text() + coordinator[0].read_text())
    _handshake(*relay, bundle)
    _handshake(*coordinator, bundle)


def test_certificate_is_made_once_and_kept(tmp_path: Path) -> None:
    first = make_self_signed(tmp_path, "relay.example")
    pem = first[0].read_bytes()
    assert make_self_signed(tmp_path, "relay.example") == first
    assert first[0].read_bytes() == pem
    assert first[1].stat().st_mode & 0o777 == 0o600
