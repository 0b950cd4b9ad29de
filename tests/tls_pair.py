"""Test helper: a self-signed certificate for 127.0.0.1 and the TLS contexts of both ends.

The `tls` fixture (tests/conftest.py) hands one out per test; relay, mesh, stream and attack
tests run our relay on loopback with it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.netio.certs import make_self_signed


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext  # trusts exactly `cert`
    cert: Path
    key: Path


def make_tls(directory: Path, host: str = "127.0.0.1") -> Tls:
    cert, key = make_self_signed(directory, host)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(cert, key)
    return Tls(server, ssl.create_default_context(cafile=str(cert)), cert, key)
